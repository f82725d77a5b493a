"""Adaptation benchmark: identity, source-only, MCD-L1/SWD/pEMD, oracle, elastix, SimpleITK.

    python benchmarks/adaptation.py            # full: 100 test pairs, 3 seeds
    python benchmarks/adaptation.py --quick    # CI-sized run of the same code path

Writes the "adaptation" section of docs/benchmarks.md, docs/benchmarks.json and
docs/images/benchmark_adaptation.png (``--out-dir`` elsewhere for quick runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from _protocol import (
    BenchmarkSettings,
    format_table,
    plot_results,
    run_benchmark,
    update_section,
)
from tqdm import tqdm

from napari_discreg.cli._common import SHIPPED_NAMES, _positive_int, _warn
from napari_discreg.core.files.atomic import replace_atomically
from napari_discreg.core.learning.discrepancy import Discrepancy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/adaptation.py",
        description="Writes the adaptation section of OUT_DIR/benchmarks.md, OUT_DIR/benchmarks.json "
        "and OUT_DIR/images/benchmark_adaptation.png.",
    )
    p.add_argument("--quick", action="store_true", help="CI-sized run of the same code path")
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    p.add_argument(
        "--model",
        default=None,
        help="source checkpoint or shipped model name (" + SHIPPED_NAMES + "); default: default",
    )
    p.add_argument("--steps", type=int, default=None, help="adaptation iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--n-test", type=_positive_int, default=None, help="held-out target pairs")
    p.add_argument(
        "--n-adapt", type=_positive_int, default=None, help="unlabelled target pairs to adapt on"
    )
    p.add_argument("--moving-contrast", choices=("t2", "pd"), default=None)
    p.add_argument(
        "--discrepancies", nargs="+", default=None, choices=[kind.value for kind in Discrepancy]
    )
    p.add_argument("--no-peers", action="store_true", help="skip elastix and SimpleITK")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--no-refine", action="store_true", help="skip the refinement rows")
    return p


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(words)
    args.command_line = shlex.join(["python", "benchmarks/adaptation.py", *words])
    return run(args)


def settings_from_args(args) -> BenchmarkSettings:
    s = BenchmarkSettings.quick() if args.quick else BenchmarkSettings()
    changes = {
        "model_path": args.model,
        "steps": args.steps,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "n_test": args.n_test,
        "n_adapt": args.n_adapt,
        "moving_contrast": args.moving_contrast,
        "discrepancies": tuple(args.discrepancies) if args.discrepancies else None,
    }
    s = replace(s, **{k: v for k, v in changes.items() if v is not None})
    if args.no_peers:
        s = replace(s, peers=())
    if args.no_oracle:
        s = replace(s, oracle=False)
    if args.no_refine:
        s = replace(s, refine=None)
    return s


def run(args) -> int:
    settings = settings_from_args(args)
    out_dir: Path = args.out_dir
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    bar = tqdm(desc="benchmark", unit="it")

    def on_record(name, seed, rec):
        bar.set_postfix_str(f"{name} seed {seed} it {rec.iteration}/{rec.total}")
        bar.update(1)

    result = run_benchmark(settings, progress=lambda m: tqdm.write(f"-> {m}"), on_record=on_record)
    bar.close()
    table = format_table(result)
    section, model_name = section_name(args.model)
    image = f"benchmark_{section.replace('-', '_')}.png"
    plot_results(result, out_dir / "images" / image)
    s = result["settings"]
    st = s.get("self_training_config")
    st_text = (
        f'"self-training (the default)": `AdaptConfig()` as shipped ({st["steps"]} steps of '
        f"the heads on the pairs' refined fields, lr {st['lr']}, batch {st['batch_size']}, "
        "keep-best by MIND-SSC on a quarter of the pairs held out); "
        if st
        else ""
    )
    text = "\n".join(
        [
            f"## Adaptation: T1 fixed vs {s['moving_contrast'].upper()}-like moving, "
            f"`{model_name}` model",
            "",
            f"Written by `{args.command_line}`. {s['n_test']} held-out test pairs (slices "
            f"{tuple(s['data_config']['test_slices'])}), adaptation on {s['n_adapt']} unlabelled target pairs from "
            f"the training slices, seeds {s['seeds']}; {st_text}"
            f'"MCD-...": the paper\'s method, `AdaptConfig.mcd()`, {s["steps"]} iterations per run; '
            f"mean ± std over seeds (rows that do not depend on the seed: std 0). "
            f"CPU, {s['threads']} thread(s), torch {s['torch']}. Time per pair: inference only for "
            'the network rows (adaptation time is in benchmarks.json). "+ refine": the same '
            f"field after instance optimisation ({_refine_text(s['refine_config'])}; MIND-SSC, "
            "diffusion regulariser; `register(refine=...)`), "
            "its label accuracy that of the refined field's quantised control points; "
            '"refine only": the same optimisation from a zero field, no network.',
            "",
            table,
            "",
            f"![adaptation benchmark](images/{image})",
        ]
    )
    update_section(out_dir / "benchmarks.md", section, text)
    json_path = out_dir / "benchmarks.json"
    blob = read_results(json_path)
    blob[section] = result
    text_json = json.dumps(blob, indent=1, default=float)

    def write(tmp: Path) -> None:
        tmp.write_text(text_json)

    replace_atomically(json_path, write)
    print(table)
    print(f"wrote {out_dir / 'benchmarks.md'} and {json_path}")
    return 0


def section_name(model: str | None) -> tuple[str, str]:
    """The docs section a run writes and the model's name in its heading: the shipped
    ``default`` model writes "adaptation", any other model "adaptation-NAME"."""
    name = "default" if model is None else Path(model).stem
    return ("adaptation" if name == "default" else f"adaptation-{name}"), name


def read_results(path: Path) -> dict:
    """The results file's other sections, or ``{}``: a file that is not a JSON object
    (truncated by a killed run, say) is set aside as ``NAME.corrupt`` with a warning, so
    that this run's results are still written."""
    if not path.exists():
        return {}
    try:
        blob = json.loads(path.read_text())
        if not isinstance(blob, dict):
            raise ValueError("not a JSON object")
        return blob
    except (ValueError, UnicodeDecodeError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        _warn(f"{path} could not be read ({exc}); moved it to {aside} and started afresh")
        return {}


def _refine_text(config: dict | None) -> str:
    if not config:
        return "none"
    return (
        f"{config['steps']} steps per level, {config.get('levels', 1)} level(s), smoothness "
        f"{config['smoothness']}, lr {config['lr']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
