"""MkDocs hooks of the docs site (not part of the package).

- The top-level README, BUILD.md and BENCHMARKS.md become the site's home, build and benchmarks
  pages, their links rewritten from the repository's paths to the site's, so each text has one copy.
- `reference/flags.md` is generated from the absl definitions of every tool, so the reference
  cannot drift from the code. Each tool is imported in a process of its own, as each defines its
  flags in the one global registry (bench and train-loop both define --batch_size).
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]

# Top-level files and the site pages they become.
TOP_LEVEL = {"README.md": "index.md", "BUILD.md": "build.md", "BENCHMARKS.md": "benchmarks.md"}

# Each tool: its script, the module that defines its flags (as each tool's `apps.run(flag_modules=...)`
# lists them), and whether it also takes the training flags. `--version` (train_loop.apps) is every tool's.
TOOLS = [
    ("train-loop", "train_loop.training_flags", False),
    ("train-loop-study", "train_loop.study.study", True),
    ("train-loop-launch", "train_loop.launch", True),
    ("train-loop-bench", "train_loop.bench.main", False),
]

# Run in a tool's own process: the flags defined by modules named `prefix...`, as JSON. A module
# named "..., internal" holds flags the tool passes to its own children, which users never set.
_DUMP = """
import importlib, json, sys
from absl import flags
importlib.import_module(sys.argv[1])
found = []
for module, defined in sorted(flags.FLAGS.flags_by_module_dict().items()):
    if module.startswith(sys.argv[1]) and "internal" not in module:
        for flag in defined:
            values = getattr(flag.parser, "enum_values", None)
            found.append(dict(name=flag.name, type=flag.flag_type(), default=flag.default_as_str or "",
                              help=flag.help, values=values, boolean=flag.boolean))
json.dump(found, sys.stdout)
"""


def _flags_of(modules: list[str]) -> dict[str, list[dict]]:
    """Each module's flags, from processes started side by side (each imports absl and the tool)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    processes = {
        module: subprocess.Popen([sys.executable, "-c", _DUMP, module], stdout=subprocess.PIPE, text=True, env=env)
        for module in modules
    }
    found = {}
    for module, process in processes.items():
        output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"listing the flags of {module} failed (exit status {process.returncode}); see above.")
        found[module] = json.loads(output)
        if not found[module]:
            raise RuntimeError(f"{module} defines no flags: the flags reference would be empty (docs/hooks/site.py).")
    return found


def _cell(text: str) -> str:
    """Help text as a table cell's plain text: `<run_name>` stays text, `w**2` no emphasis, `|` no column."""
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", html.escape(text, quote=False)).replace("\n", " ")


def _table(found: list[dict]) -> str:
    rows = ["| flag | type | default | help |", "|---|---|---|---|"]
    for flag in sorted(found, key=lambda flag: flag["name"]):
        name = f"--[no]{flag['name']}" if flag["boolean"] else f"--{flag['name']}"
        kind = " \\| ".join(f"`{value}`" for value in flag["values"]) if flag["values"] else flag["type"]
        default = flag["default"].strip("'\"")
        default = f"`{default}`".replace("|", "\\|") if default else "empty"
        rows.append(f"| `{name}` | {kind} | {default} | {_cell(flag['help'])} |")
    return "\n".join(rows)


def flags_page() -> str:
    parts = [
        "# Flags reference\n",
        "Generated when the site is built, from the flags each tool defines (absl), so it says what the "
        "code says. [Flags](../flags.md) explains them at length. Every tool also takes `--version`, "
        "`--helpshort` and `--helpfull`, and `--flagfile=FILE`.\n",
    ]
    found = _flags_of([module for _, module, _ in TOOLS])
    for script, module, takes_training_flags in TOOLS:
        also = " It takes the training flags of `train-loop` too." if takes_training_flags else ""
        parts.append(f"## {script}\n\nDefined in `{module}`.{also}\n\n{_table(found[module])}\n")
    parts.append("## train-loop-compare\n\nTakes one folder and no flags of its own.\n")
    return "\n".join(parts)


def _site_links(markdown: str, *, prefix: str) -> str:
    """Rewrites links written for the repository (`docs/x.md`, `BUILD.md`, `../BUILD.md`) into the
    site's (`x.md`, `build.md`); `prefix` is how a page reaches the top level ("" or "../")."""
    for source, page in TOP_LEVEL.items():
        markdown = markdown.replace(f"]({prefix}{source}", f"]({page}")
    return re.sub(r"\]\(docs/", "](", markdown) if prefix == "" else markdown


def on_files(files, config):
    for source, page in TOP_LEVEL.items():
        text = _site_links((ROOT / source).read_text(encoding="utf-8"), prefix="")
        files.append(File.generated(config, page, content=text))
    files.append(File.generated(config, "reference/flags.md", content=flags_page()))
    return files


def on_page_markdown(markdown, page, config, files):
    if "/" not in page.file.src_uri:
        return _site_links(markdown, prefix="../")
    return markdown
