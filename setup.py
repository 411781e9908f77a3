"""Package metadata for dlcourse, read from settings.ini (the nbdev 2 convention).

No pkg_resources: it is gone from current setuptools. The build backend is declared in pyproject.toml;
MANIFEST.in puts settings.ini in the sdist, so a wheel can be built from the sdist.
"""
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).parent
config = ConfigParser(delimiters=["="])
config.read(here / "settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": "Apache-2.0"}  # SPDX expressions (PEP 639: license classifiers are deprecated)
# `status = N` in settings.ini is PyPI's "Development Status :: N - ...": 3 is Alpha.
statuses = {1: "1 - Planning", 2: "2 - Pre-Alpha", 3: "3 - Alpha", 4: "4 - Beta", 5: "5 - Production/Stable",
            6: "6 - Mature", 7: "7 - Inactive"}
# The Python versions the package is tested on or known to work with, from min_python up.
py_versions = ["3.10", "3.11", "3.12", "3.13"]
license_expression = licenses[cfg["license"]]
status = statuses[int(cfg["status"])]
python_classifiers = [f"Programming Language :: Python :: {v}" for v in py_versions[py_versions.index(cfg["min_python"]):]]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
console_scripts = cfg.get("console_scripts", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license_expression=license_expression,
    license_files=["LICENSE"],
    url=cfg["git_url"],
    project_urls={"Documentation": cfg["doc_host"] + cfg["doc_baseurl"], "Source": cfg["git_url"],
                  "Issues": cfg["git_url"] + "/issues"},
    keywords=cfg["keywords"].split(),
    classifiers=[
        f"Development Status :: {status}",
        f"Intended Audience :: {cfg['audience'].title()}",
        f"Natural Language :: {cfg['language'].title()}",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        *python_classifiers,
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_namespace_packages(include=["dlcourse", "dlcourse.*"], exclude=["*.__pycache__"]),
    include_package_data=True,
    package_data={"dlcourse": ["data/*", "data/**/*"]},
    install_requires=requirements,
    extras_require={"dev": dev_requirements},
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
