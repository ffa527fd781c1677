"""Everything that stands in for a document's KV cache, behind one protocol (`attention.ContextProvider`:
a query in, the document part's output and log-sum-exp out): the exact cache, exact tokens stored as
codes, the module banks (MLP, quadrature, and their fused inference form), and every baseline nectar is
compared with at the same bytes. Also the attention kernels and the log-sum-exp merge they share."""
