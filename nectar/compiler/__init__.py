"""The compile: a document in, an Artifact out. `pipeline.compile_bank` is the pipeline on one screen; each
stage is a function of explicit data (workspace: the document, its training set and what compiles share;
plan: defaults, exact tokens and widths; probe: where the KL is; capture, fit, refine), and `corpus`
compiles many documents on Ray."""
