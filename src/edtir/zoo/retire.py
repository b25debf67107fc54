"""Retire superseded bundled models: move their registry entries to ``retired.json`` and delete their files.

    python -m edtir.zoo.retire edt-t-sr-x4-291 edt-t-sr-x4-gpu-291      # files must be committed at HEAD
    python -m edtir.zoo.retire NAME --commit 134b166                     # or at another commit
    python -m edtir.zoo.retire                                           # only print the zoo's sizes

Every bundled file travels with the repository, to users and to a GPU lease that carries 64 MiB in all, so the
zoo keeps the defaults and the models other work names, and a superseded model leaves. Nothing is lost: the
entry (scores, recipe, data) stays on record with the commit that holds the file, which this tool checks against
the entry's sha256 before deleting anything; ``edtir.zoo.restore_command(NAME)`` gives the command that brings
it back. A default is never retired: bundle its successor first.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from ..errors import run_script
from . import HERE, registry, restore_command, retired


def git(folder: Path, *args: str) -> bytes | None:
    """stdout of ``git -C folder ARGS``; None when git fails or is missing."""
    try:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def committed_sha256(folder: Path, commit: str, file: str) -> str | None:
    """sha256 of ``folder/file`` as ``commit`` holds it, None when it does not."""
    blob = git(folder, "show", f"{commit}:./{file}")
    return None if blob is None else hashlib.sha256(blob).hexdigest()


def sizes(folder: Path, reg: dict, old: dict) -> str:
    """What the package ships against what it would with every retired file, the README's figures."""
    shipped = sum((folder / e["file"]).stat().st_size for e in reg.values())
    blobs = [git(folder, "cat-file", "-s", f"{e['retired']['commit']}:{e['retired']['path']}") for e in old.values()]
    if None in blobs:
        return f"{len(reg)} bundled files, {shipped / 1e6:.1f} MB (no git history here to size the retired ones)"
    gone = sum(int(b) for b in blobs)
    return (f"{len(reg)} bundled files, {shipped / 1e6:.1f} MB; with the {len(old)} retired ones (in git history) "
            f"{(shipped + gone) / 1e6:.1f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="bundled models to retire (none: only print the zoo's sizes)")
    ap.add_argument("--commit", default="HEAD", help="a commit that holds their files (default: HEAD)")
    ap.add_argument("--zoo", type=Path, default=HERE, help="the zoo folder (default: the bundled one)")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"edtir.zoo.retire: {msg}", file=sys.stderr)
        return 2

    names = list(dict.fromkeys(args.names))  # a name given twice is retired once
    if not (args.zoo / "registry.json").is_file():
        return fail(f"{args.zoo} holds no registry.json (not a zoo folder)")
    reg, old = registry(args.zoo), retired(args.zoo)
    if not names:
        print(sizes(args.zoo, reg, old))
        return 0
    owners = {t: n for n, e in reg.items() for t in e["default_for"]}
    commit = git(args.zoo, "rev-parse", "--verify", f"{args.commit}^{{commit}}")
    prefix = git(args.zoo, "rev-parse", "--show-prefix")
    if commit is None or prefix is None:
        return fail(f"{args.commit!r} is not a commit of a git checkout holding {args.zoo}")
    commit, prefix = commit.decode().strip(), prefix.decode().strip()
    for name in names:
        if name not in reg:
            return fail(f"{name!r} is not a bundled model")
        if reg[name]["default_for"]:
            return fail(f"{name!r} is the default for {', '.join(reg[name]['default_for'])}; bundle its "
                        "successor first")
        if committed_sha256(args.zoo, commit, reg[name]["file"]) != reg[name].get("sha256"):
            return fail(f"{commit[:12]} does not hold {reg[name]['file']} as the registry records it "
                        "(commit it first, or name a commit that has it)")
    today = datetime.date.today().isoformat()
    for name in names:
        e = reg.pop(name)
        after = dict.fromkeys(owners[t] for t in e["tasks"] if t in owners)
        old[name] = {**e, "retired": {"commit": commit, "path": prefix + e["file"], "date": today,
                                      "replaced_by": ", ".join(after) or "-"}}
    from ..data.io import atomic_write_bytes

    for path, doc in ((args.zoo / "retired.json", old), (args.zoo / "registry.json", reg)):
        text = json.dumps(doc, indent=2) + "\n"
        atomic_write_bytes(path, lambda tmp, text=text: Path(tmp).write_text(text))
    for name in names:
        (args.zoo / old[name]["file"]).unlink(missing_ok=True)
        print(f"retired {name}; back with: {restore_command(old[name])}")
    print(sizes(args.zoo, reg, old))
    return 0


if __name__ == "__main__":
    run_script(main, "python -m edtir.zoo.retire")
