"""Packaging: `python -m build` makes an sdist that holds what setup.py reads, and a wheel built FROM that sdist
holds the metadata from settings.ini, every module and the tiny Imagenette sample; the README works on PyPI.

Offline: no isolated build environment (`--no-isolation` uses this venv's setuptools and build, both dev
requirements). The build runs on a copy of the files a fresh clone has, so it leaves the checkout untouched.
"""
import configparser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from conftest import ROOT


def settings() -> configparser.SectionProxy:
    """settings.ini's [DEFAULT] section, parsed the way setup.py parses it."""
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def clone_files() -> list:
    """The files a fresh clone would have (tracked, plus new files git does not ignore), relative to ROOT."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True)
    if proc.returncode != 0:  # not a git checkout: take the tree as it is, less the usual build leftovers
        skip = {".git", ".venv", "_proc", "_docs", "dist", "build", "__pycache__"}
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]
    return [name for name in proc.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def build(*args, cwd:Path):
    """Run `python -m build --no-isolation *args`; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"python -m build {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def only(paths) -> Path:
    """The single path in `paths`."""
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """Build the sdist from a copy of the clone, then the wheel from the unpacked sdist (what pip does)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, out, unpacked = tmp / "src", tmp / "dist", tmp / "unpacked"
    for name in clone_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    build("--sdist", "--outdir", str(out), str(src), cwd=tmp)
    sdist = only(out.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(unpacked, filter="data")
        else:  # Python < 3.10.12 has no extraction filters
            tar.extractall(unpacked)
    build("--wheel", "--outdir", str(out), str(only(unpacked.iterdir())), cwd=tmp)
    return {"src": src, "sdist": sdist, "wheel": only(out.glob("*.whl"))}


def sdist_names(sdist:Path) -> set:
    """The sdist's file names, without the leading `name-version/` folder."""
    with tarfile.open(sdist) as tar:
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}


def sample_files(src:Path) -> list:
    """The tiny sample's files, relative to the source tree."""
    files = sorted(p.relative_to(src).as_posix() for p in (src / "dlcourse" / "data").rglob("*") if p.is_file())
    assert len(files) > 100, "the tiny Imagenette sample is missing from dlcourse/data"
    return files


def wheel_metadata(wheel:Path):
    """The wheel's METADATA as an email.message.Message."""
    with zipfile.ZipFile(wheel) as zf:
        name = only(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode("utf-8"))


def test_sdist_holds_what_setup_py_reads(dists):
    """The sdist carries settings.ini (setup.py reads every field from it), the build backend, the license,
    the README (the long description) and the tiny sample."""
    names = sdist_names(dists["sdist"])
    for name in ["settings.ini", "setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md"]:
        assert name in names, f"{name} is not in the sdist"
    missing = [f for f in sample_files(dists["src"]) if f not in names]
    assert not missing, f"{len(missing)} sample files not in the sdist, e.g. {missing[:3]}"


def test_wheel_metadata_comes_from_settings(dists):
    cfg, meta = settings(), wheel_metadata(dists["wheel"])
    assert meta["Name"] == cfg["lib_name"]
    assert meta["Version"] == cfg["version"]
    assert meta["Summary"] == cfg["description"]
    assert meta["Author"] == cfg["author"]
    assert meta["Requires-Python"] == f">={cfg['min_python']}"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Keywords"].split(",") == cfg["keywords"].split()
    assert meta.get_all("Requires-Dist")[:len(cfg["requirements"].split())] == cfg["requirements"].split()
    dev = [r.split(";")[0].strip() for r in meta.get_all("Requires-Dist") if 'extra == "dev"' in r]
    assert dev == cfg["dev_requirements"].split()
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls["Documentation"] == cfg["doc_host"] + cfg["doc_baseurl"]
    assert urls["Source"] == cfg["git_url"]
    assert meta.get_payload().strip() == (dists["src"] / "README.md").read_text(encoding="utf-8").strip()


def test_wheel_classifiers(dists):
    """`status = 3` is "3 - Alpha" (a 0-based list once made it "4 - Beta"); one classifier per supported Python;
    no license classifier (PEP 639: the SPDX License-Expression replaces them)."""
    cfg, classifiers = settings(), wheel_metadata(dists["wheel"]).get_all("Classifier")
    labels = {"1": "Planning", "2": "Pre-Alpha", "3": "Alpha", "4": "Beta", "5": "Production/Stable", "6": "Mature"}
    status = [c for c in classifiers if c.startswith("Development Status :: ")]
    assert status == [f"Development Status :: {cfg['status']} - {labels[cfg['status']]}"]
    pythons = [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert pythons == ["3.10", "3.11", "3.12", "3.13"]
    assert pythons[0] == cfg["min_python"]
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_wheel_holds_modules_sample_and_entry_points(dists):
    src = dists["src"]
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = set(zf.namelist())
        modules = {f"dlcourse/{p.name}" for p in (src / "dlcourse").glob("*.py")}
        assert modules and modules == {n for n in names if re.fullmatch(r"dlcourse/[^/]+\.py", n)}
        for name in sample_files(src):
            assert name in names, f"{name} is not in the wheel"
            assert hashlib.sha256(zf.read(name)).digest() == hashlib.sha256((src / name).read_bytes()).digest()
        entry_points = zf.read(only(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "[console_scripts]\ndlcourse = dlcourse.cli:main" in entry_points
    assert "[nbdev]\ndlcourse = dlcourse._modidx:d" in entry_points


def test_readme_links_work_on_pypi():
    """PyPI shows the README out of the repository: every link is absolute, and the docs site is linked."""
    cfg, readme = settings(), (ROOT / "README.md").read_text(encoding="utf-8")
    relative = [url for url in re.findall(r"\]\(([^)\s]+)", readme) if not url.startswith(("https://", "http://", "#"))]
    assert not relative, f"relative links in README.md (they break on PyPI): {relative}"
    assert cfg["doc_host"] + cfg["doc_baseurl"] in readme


def words(markdown:str) -> list:
    """The words of a markdown text, ignoring layout: HTML comments, escapes, table rules, typographic quotes."""
    markdown = re.sub(r"<!--.*?-->", " ", markdown, flags=re.S).replace("\\", "")
    for fancy, plain in {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}.items():
        markdown = markdown.replace(fancy, plain)
    return re.findall(r"\w+", markdown)


def index_text(nb:dict) -> str:
    """What nbdev_readme renders from index.ipynb: every cell's text, less the `>` summary (it becomes metadata)."""
    cells = ["".join(cell["source"]) for cell in nb["cells"]]
    cells[0] = "\n".join(line for line in cells[0].splitlines() if not line.startswith(">"))
    return "\n\n".join(cells)


def test_readme_matches_index_notebook():
    """README.md is rendered from nbs/index.ipynb (nbdev_readme, which needs Quarto): the two say the same words,
    so an edit to one that was not made to the other shows here."""
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text(encoding="utf-8"))
    assert nb["cells"][0]["source"][0].startswith("# "), "index.ipynb starts with its `# title` cell"
    assert "".join(nb["cells"][0]["source"]).splitlines()[-1] == f"> {settings()['description']}"
    readme, index = words((ROOT / "README.md").read_text(encoding="utf-8")), words(index_text(nb))
    if readme != index:
        at = next((i for i, (a, b) in enumerate(zip(readme, index)) if a != b), min(len(readme), len(index)))
        pytest.fail("README.md and nbs/index.ipynb differ (edit nbs/index.ipynb, then `make readme`) near word "
                    f"{at}: README {' '.join(readme[max(0, at - 8):at + 8])!r} vs index {' '.join(index[max(0, at - 8):at + 8])!r}")


def test_sidebar_and_readme_list_every_notebook():
    """The documentation site's sidebar and the README's notebook table name every notebook, in order."""
    notebooks = sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb") if p.name != "index.ipynb")
    sidebar = re.findall(r"^\s+- (\S+\.ipynb)$", (ROOT / "nbs" / "sidebar.yml").read_text(), flags=re.M)
    assert sidebar == ["index.ipynb", *notebooks]
    table = re.findall(r"^\| \[(\w+)\]\(", (ROOT / "README.md").read_text(), flags=re.M)
    assert table == [name.removesuffix(".ipynb") for name in notebooks]
