"""Config fields are described once: their metadata feeds --set, the CLI help and docs/options.md, and
every reason links to a decision that exists. --set and eval's ablations parse one grammar."""
import re
from dataclasses import fields
from pathlib import Path

import pytest

from nectar.config import CompileConfig, FitConfig, PromptConfig, options_page, parse_settings, with_changes
from nectar.errors import NectarError

DOCS = Path(__file__).parent.parent / "docs"


def _all_fields():
    return [f for cls in (CompileConfig, FitConfig, PromptConfig) for f in fields(cls)]


def test_docs_options_is_generated_from_the_fields():
    assert (DOCS / "options.md").read_text() == options_page(), "run: python -m nectar.config > docs/options.md"


def test_every_field_says_its_meaning_and_reasons_link_to_decisions():
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', (DOCS / "decisions.md").read_text()))
    for f in _all_fields():
        assert f.metadata.get("meaning"), f"{f.name} has no meaning"
        assert not re.search(r"\d\.\d|\d%", f.metadata.get("why", "")), f"{f.name}: a measurement belongs in decisions.md"
        if f.metadata.get("see"):
            assert f.metadata["see"] in anchors, f"{f.name} links to a missing decision"


def test_settings_parse_by_each_fields_type():
    changes = parse_settings(["fit.steps=600", "share_power=2", "exact_share=none", "target_softmax=0",
                              "prompts=104", "holdout=prompts", "variant=quadrature"])
    assert changes == {"fit": {"steps": 600, "share_power": 2.0}, "exact_share": None, "target_softmax": False,
                       "prompts": {"total": 104, "holdout": "prompts"}, "variant": "quadrature"}
    config = with_changes(CompileConfig(), changes)
    assert config.fit.steps == 600 and config.prompts.holdout == "prompts" and config.variant == "quadrature"
    assert sum((config.prompts.recall, config.prompts.self_study, config.prompts.generic, config.prompts.direct)) == 104
    assert with_changes(CompileConfig(), parse_settings(["prompts=208"])) == CompileConfig()  # the default mix


@pytest.mark.parametrize("items, pattern", [(["steps"], "write FIELD=VALUE"), (["nope=1"], "no config field nope"),
                                            (["fit.recall=3"], "no config field fit.recall"),
                                            (["depth=two"], "not a valid depth"), (["prompts=-3"], "not a valid prompts"),
                                            (["target_softmax=maybe"], "not a valid target_softmax")])
def test_bad_settings_say_what_to_write(items, pattern):
    with pytest.raises(NectarError, match=pattern):
        parse_settings(items)


def test_bad_values_are_refused_by_the_configs_own_checks():
    with pytest.raises(NectarError, match="depth must be >= 1"):
        with_changes(CompileConfig(), parse_settings(["depth=0"]))


def test_eval_ablations_speak_the_same_grammar_and_keep_shared_fields():
    from nectar.eval.runner import nectar_changes

    assert nectar_changes("nectar+fit.steps=600+exact_share=0") == parse_settings(["fit.steps=600", "exact_share=0"])
    with pytest.raises(NectarError, match="every compile of an evaluation shares it"):
        nectar_changes("nectar+seed=3")


def test_every_effort_level_is_a_valid_config_and_an_unknown_one_is_refused_in_one_line():
    from nectar.config import EFFORTS, at_effort

    for name in EFFORTS:
        assert isinstance(at_effort(name), CompileConfig)
    assert at_effort("default") == CompileConfig()
    quick = at_effort("quick")
    assert quick.prompts.self_study == 0 and quick.allocation == "uniform"  # no written questions, no probe
    with pytest.raises(NectarError, match=r"^unknown effort 'best': use one of quick, fast, default$"):
        at_effort("best")
