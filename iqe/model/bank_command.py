"""`iqe bank`: the command line of the MVFA memory bank (iqe.model.bank).

Kept apart from the bank's torch code so that registering the subcommand imports nothing
heavy (every `iqe` start registers it; the ONNX Runtime path must not load torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from iqe.errors import InputError


def cmd_bank(args: argparse.Namespace) -> int:
    """Build an MVFA bundle's few-shot memory bank from K normal support images (and fit the fusion)."""
    from iqe.model.bank import AUGMENT_FACTOR, _load_images, bank_features, fit_fusion, select_support, with_bank
    from iqe.model.bundle import load_bundle, save_bundle
    from iqe.model.families import family_name

    model = load_bundle(args.bundle)
    if family_name(model) != "mvfa":
        raise InputError(f"{args.bundle}: `iqe bank` is for MVFA bundles (this one is {family_name(model)})")
    support = select_support(args.support, args.shots, args.seed_file, args.iteration)
    bank = bank_features(model, _load_images(support, model.cfg.image_size), args.batch, progress=not args.quiet)
    model = with_bank(model, bank, support, args.shots)
    if args.fusion:
        zlo, zhi, flo, fhi = args.fusion
        cfg = dataclasses.replace(model.cfg, fusion_zero=[zlo, zhi], fusion_few=[flo, fhi], fusion_source="given")
        model.cfg = cfg.validate()
    elif args.calibrate:
        from iqe.model.preprocess import list_images

        files = list_images([args.calibrate])
        if not files:
            raise InputError(f"{args.calibrate}: no images to calibrate the fusion on")
        model = fit_fusion(model, _load_images(files, model.cfg.image_size),
                           f"fitted on {len(files)} images of {args.calibrate}", args.batch)
    out = args.out or args.bundle
    save_bundle(model, out, force=args.out is None or bool(getattr(args, "force", False)))  # in place by default
    c = model.cfg
    print(f"wrote {out}: bank {list(model.bank.shape)} ({c.bank_head} head, {args.shots} shots x {AUGMENT_FACTOR}), "
          f"fusion zero {c.fusion_zero} few {c.fusion_few} ({c.fusion_source})", file=sys.stderr)
    return 0


def _four_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected ZERO_MIN,ZERO_MAX,FEW_MIN,FEW_MAX, got '{text}'")
    return values


def register(add) -> None:
    from iqe.argtypes import int_at_least

    p = add("bank", cmd_bank)
    p.add_argument("bundle", type=Path, help="MVFA bundle (from `iqe import-reference --family mvfa`)")
    p.add_argument("--support", type=Path, required=True, help="folder of normal support images")
    p.add_argument("--shots", type=int_at_least(1), default=4, help="K support images")
    p.add_argument("--seed-file", type=Path, default=None,
                   help="reference few-shot seed file (fewshot_seed/<Obj>/<K>-shot.txt): take its n-<iteration> names")
    p.add_argument("--iteration", type=int, default=0, help="seed-file iteration")
    p.add_argument("--calibrate", type=Path, default=None,
                   help="folder of images to fit the fusion's min-max constants on (else identity or --fusion)")
    p.add_argument("--fusion", type=_four_floats, default=None, metavar="ZMIN,ZMAX,FMIN,FMAX",
                   help="fusion min-max constants given directly")
    p.add_argument("--batch", type=int_at_least(1), default=8, help="images per forward pass")
    p.add_argument("--out", type=Path, default=None, help="bundle to write (default: replace BUNDLE)")
