"""Build ``.carry/shared``: the part of ``../shared`` a GPU lease needs, small enough to travel with the repository.

    python benchmarks/prepare_carry.py                            # the 291 set + Set5 + the Rain100 overlap list
    python benchmarks/prepare_carry.py --eval Set5 Set14 --reference   # + Set14 and the official-output reference

A lease copies the repository's tracked files and the ``carry`` paths, 64 MiB in all, and ``../shared`` does not
travel. ``benchmarks/gpu_suite.sh`` links ``.carry/shared`` as ``../shared`` when there is none, so the same
commands run there: ``run(command="bash benchmarks/gpu_suite.sh", carry=[".carry"])``. Images are re-encoded as
lossless WebP (the 291 set: 59 MB of PNG, about 39 MB), each checked to decode to the same pixels (grey and 16-bit
images are copied as they are); datasets match files by stem, so configs and the exclude list work unchanged.
Prints what the lease would carry against the budget and exits 1 when it is over.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from edtir.data.io import atomic_write_bytes, is_image_file

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def tracked_bytes() -> int:
    """What the repository's own files weigh in a lease (tracked files; git-ignored ones stay behind)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"prepare_carry: {REPO} is not a git checkout (git ls-files failed)") from None
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def webp_copy(src: Path, dst: Path) -> None:
    """``src`` as lossless WebP at ``dst``, refused unless it decodes to exactly the same pixels. WebP has no grey
    or 16-bit mode, so other images are copied as they are (same stem, their own suffix)."""
    with Image.open(src) as im:
        im.load()
        mode, want = im.mode, np.asarray(im)
    if mode not in ("RGB", "RGBA"):
        atomic_write_bytes(dst.with_suffix(src.suffix), lambda tmp: shutil.copyfile(src, tmp))
        return
    atomic_write_bytes(dst, lambda tmp: Image.fromarray(want).save(tmp, format="WEBP", lossless=True, quality=100,
                                                                    method=4))
    with Image.open(dst) as back:
        got = np.asarray(back.convert(mode))
    if got.shape != want.shape or not np.array_equal(got, want):
        dst.unlink()
        raise SystemExit(f"{src}: the WebP copy differs from the original")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared folder (../shared)")
    ap.add_argument("--out", type=Path, default=REPO / ".carry" / "shared", help="where to write (.carry/shared)")
    ap.add_argument("--train", nargs="*", default=["T91", "BSD200"], help="training folders of data/ (WebP)")
    ap.add_argument("--eval", nargs="*", default=["Set5"], help="test folders of data/ (WebP)")
    ap.add_argument("--reference", action="store_true", help="also reference/ (official output, for tests)")
    ap.add_argument("--budget-mib", type=float, default=64, help="what a lease carries in all (64 MiB)")
    args = ap.parse_args(argv)

    data = args.shared / "data"
    missing = [n for n in args.train + args.eval if not (data / n).is_dir()]
    if missing:
        print(f"prepare_carry: {data}: no folder {missing[0]}", file=sys.stderr)
        return 2
    jobs = [(p, args.out / "data" / n / p.relative_to(data / n).with_suffix(".webp"))
            for n in args.train + args.eval for p in sorted((data / n).rglob("*")) if is_image_file(p)]
    for src, dst in tqdm(jobs, desc="lossless WebP", unit="img"):
        if not dst.exists() and not dst.with_suffix(src.suffix).exists():  # a rerun only adds what is missing
            dst.parent.mkdir(parents=True, exist_ok=True)
            webp_copy(src, dst)
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    for f in data.glob("*.txt"):  # the exclude lists (rain100-overlap-BSD200.txt)
        shutil.copy2(f, args.out / "data" / f.name)
    if args.reference:
        shutil.copytree(args.shared / "reference", args.out / "reference", dirs_exist_ok=True)
    carry = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    repo = tracked_bytes()
    total, budget = (carry + repo) / MIB, args.budget_mib
    print(f"{args.out}: {carry / MIB:.1f} MiB ({len(jobs)} images); repository (tracked files): {repo / MIB:.1f} MiB; "
          f"a lease carrying it: {total:.1f} of {budget:g} MiB")
    if total > budget:
        print(f"prepare_carry: {total - budget:.1f} MiB over the lease's limit: carry fewer folders", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
