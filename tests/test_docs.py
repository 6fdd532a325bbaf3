"""The documentation tells the truth about the command line and stands as a
front page plus a site: the command-line page is what the flag definitions
generate, every --flag a page names exists, and no page narrates the project's
history. (`mkdocs build --strict`, which checks links and anchors, runs in CI.)"""

import pathlib
import re

from absl import flags as absl_flags

import flags
from flags import reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Flags of other programs that the pages show in their commands.
OTHER_PROGRAMS = {
    "no-deps": "pip", "rm": "docker", "model-repository": "tritonserver",
    "data-binary": "curl", "logdir": "tensorboard", "strict": "mkdocs",
    "site-dir": "mkdocs", "no-keras": "a benchmark's torch-only switch",
    "loss": "the PyTorch speed peer", "amp": "the PyTorch speed peer",
}


def our_flags():
    flags.define_flags()
    return {f.name: f for f in absl_flags.FLAGS.get_flags_for_module(flags.__name__)}


def benchmark_flags():
    """Flags of the scripts in tests/benchmarks and .ci (argparse or absl)."""
    names = set()
    for script in [*(ROOT / "tests" / "benchmarks").glob("*.py"), *(ROOT / ".ci").glob("*.py")]:
        text = script.read_text()
        names |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", text))
        names |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text))
    return names


def test_the_command_line_page_is_what_the_flag_definitions_generate():
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == reference.markdown(), (
        "docs/cli.md is stale: python -m flags.reference > docs/cli.md")
    for name in our_flags():
        assert f"| `--{name}` |" in page, name
    for mode in flags.MODES:
        assert f"| `{mode}` |" in page, mode


def test_every_flag_a_page_names_exists():
    known = set(our_flags())
    booleans = {n for n, f in our_flags().items() if f.flag_type() == "bool"}
    allowed = (known | {"no" + n for n in booleans} | benchmark_flags() | set(OTHER_PROGRAMS)
               | {"flagfile", "help", "helpfull", "name", "noname"})
    unknown = {}
    for page in PAGES:
        for name in re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", page.read_text()):
            if name not in allowed:
                unknown.setdefault(str(page.relative_to(ROOT)), set()).add(name)
    assert not unknown, unknown


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first = "\n".join(readme.splitlines()[:120]).lower()
    for topic in ("install", "python main.py --mode=distill", "own data", "teacher",
                  "model.fit", "evaluat", "export", "status"):
        assert topic in first, topic


def test_no_page_narrates_the_project_history():
    """History belongs to CHANGELOG.md: pages describe the product as it is."""
    history = re.compile(r"\b[Ii]ssues? #?\d+|\bthis issue\b|(?:previous|earlier|old) README",
                         re.I)
    hits = {str(p.relative_to(ROOT)): history.findall(p.read_text()) for p in PAGES}
    assert not {p: h for p, h in hits.items() if h}


def test_license_and_citation():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    import yaml
    from jsonschema import Draft7Validator
    import json
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    schema = json.loads((ROOT / "tests" / "data" / "citation-cff-1.2.0.schema.json").read_text())
    errors = sorted(e.message for e in Draft7Validator(schema).iter_errors(citation))
    assert not errors, errors
    assert citation["license"] == "Apache-2.0"
    paper = citation["references"][0]
    assert paper["title"] == ("ARDIR: Improving Robustness using Knowledge Distillation "
                              "of Internal Representation")


def test_the_sites_home_is_the_readme_with_links_for_the_site():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    home = hooks.site_home("[the objective](docs/objective.md), [x](docs/cli.md#run), "
                           "[LICENSE](LICENSE), [site](https://example.org/a.md)")
    assert home == ("[the objective](objective.md), [x](cli.md#run), LICENSE, "
                    "[site](https://example.org/a.md)")
    assert "docs/index.md" not in (ROOT / "mkdocs.yml").read_text()  # it is nav's index.md
    assert "README.md" in (ROOT / "docs" / "index.md").read_text()
