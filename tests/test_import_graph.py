"""The trainer's import graph: no circles between modules of `latentforge.train`, and importing the trainer
loads no text encoder, tokenizer or preprocessing code (the trainer reads only the cache)."""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest

PACKAGE = "latentforge.train"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # grimp sees every import statement, also those inside functions and under TYPE_CHECKING, so a circle
    # hidden behind a lazy import counts here as well.
    return grimp.build_graph(PACKAGE)


def _circles(graph: grimp.ImportGraph) -> dict[str, list[str]]:
    """module -> the modules it imports (directly or not) that also import it."""
    found = {}
    for module in sorted(graph.modules):
        both = graph.find_upstream_modules(module) & graph.find_downstream_modules(module)
        if both:
            found[module] = sorted(both)
    return found


def test_no_import_circles_in_train(graph):
    assert _circles(graph) == {}


@pytest.mark.parametrize(("a", "b"), [("trainer", "validation"), ("export", "single_file")])
def test_former_circles_are_one_way(graph, a, b):
    """The two circles this package used to have: at most one direction remains."""
    there = graph.find_shortest_chain(importer=f"{PACKAGE}.{a}", imported=f"{PACKAGE}.{b}")
    back = graph.find_shortest_chain(importer=f"{PACKAGE}.{b}", imported=f"{PACKAGE}.{a}")
    assert there is None or back is None, (there, back)
    assert back is None, f"{b} imports {a}: {back}"


def test_validation_never_sees_the_trainer(graph):
    """Validation gets the model and a StepSetup as arguments; it imports nothing that imports the trainer."""
    assert f"{PACKAGE}.trainer" not in graph.find_upstream_modules(f"{PACKAGE}.validation")
    assert f"{PACKAGE}.trainer" not in graph.find_modules_directly_imported_by(f"{PACKAGE}.validation")


def test_both_exports_read_checkpoints_through_one_helper(graph):
    for module in ("export", "single_file"):
        assert graph.direct_import_exists(importer=f"{PACKAGE}.{module}", imported=f"{PACKAGE}.checkpoint_weights")
    assert f"{PACKAGE}.export" not in graph.find_upstream_modules(f"{PACKAGE}.single_file")


def test_importing_the_trainer_loads_no_text_encoder_or_tokenizer():
    code = """
import sys
import latentforge.train.trainer
exact = {"transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
         "transformers.models.gemma2.modeling_gemma2"}
bad = sorted(m for m in sys.modules
             if m in exact or "tokenization" in m or m == "latentforge.preprocess" or m.startswith("latentforge.preprocess."))
print(bad)
sys.exit(1 if bad else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
