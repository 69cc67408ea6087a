"""``locdiff`` command line: train, config, evaluate, predict, embed, demo, bench.

Every user error (a setting out of range, a missing or malformed file, a damaged run
folder, a run folder in use, a missing optional package) ends with one line on stderr
naming the argument or file, the value and what is expected, exit code 2, before any work
and with nothing written half-way. A training run stopped by SIGINT or SIGTERM saves a
checkpoint and exits with 130 or 143. docs/cli.md lists the guarantees.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from locdiff import distributed
from locdiff.cli_common import CliError, require_packages
from locdiff.data.files import DataError

__all__ = ["CliError", "build_parser", "main"]


def cmd_demo(args) -> int:
    from locdiff.demo import run_demo
    from locdiff.runfolder import check_run_folder

    for flag, value in (("--seed", args.seed), ("--split-seed", args.split_seed)):
        if value < 0:
            raise CliError(f"{flag} {value}: expected an integer >= 0")
    check_run_folder(args.out)  # a file or an unwritable place: before the minutes of work
    require_packages("demo")  # before the folder is made
    run_demo(args.out, split=args.split, device=args.device, seed=args.seed, split_seed=args.split_seed,
             variant=args.text)
    return 0


def cmd_embed(args) -> int:
    from tqdm.auto import tqdm

    from locdiff.embed import embed_images

    res = embed_images(args.images, args.out, model=args.model, pretrained=args.pretrained,
                       batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                       device=args.device, log=lambda msg: tqdm.write(f"locdiff embed: {msg}", file=sys.stderr))
    print(res.summary())
    return 0


def cmd_bench(args) -> int:
    print("Benchmarks live in benchmarks/ (pytest-benchmark). Run them from a source checkout with:\n"
          "    pip install -e '.[bench]'\n    pytest benchmarks --benchmark-only")
    return 0


# ---- parser ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the usage first), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version_line() -> str:
    """What a bug report needs: locdiff's version and build, torch's and Python's."""
    import platform

    import torch

    import locdiff

    build = "CUDA" if locdiff.has_cuda() else "CPU"
    return (f"locdiff {locdiff.__version__} ({build} build), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def build_parser() -> argparse.ArgumentParser:
    from locdiff import cli_predict, cli_train

    p = _Parser(prog="locdiff", description="Geolocation by diffusion in spherical-harmonic space.")
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cli_train.add_parsers(sub)
    cli_predict.add_parsers(sub)

    d = sub.add_parser("demo", help="offline places task: build, train, evaluate, map (about 13 min on 2 CPU cores)")
    d.add_argument("--out", default="locdiff_demo", help="output folder (default ./locdiff_demo)")
    d.add_argument("--split", choices=("regions", "random"), default="regions",
                   help="test places: whole unseen (country, region) groups (default) or 10%% at random")
    d.add_argument("--text", choices=("full", "name"), default="full",
                   help="what is embedded: 'City, Region, Country' (default) or the city name alone, "
                        "where one name can mean places far apart")
    d.add_argument("--seed", type=int, default=0, help="seed of the learned models; the split stays (default 0)")
    d.add_argument("--split-seed", type=int, default=0,
                   help="seed of the test split: which regions or places are held out (default 0)")
    d.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("embed", help="CLIP embeddings of photos (files or folders) for train and predict")
    m.add_argument("images", nargs="+", help="JPEG, PNG or WebP files, or folders searched recursively")
    m.add_argument("--out", required=True, help="output folder: .npy shards, manifest.csv, encoder.json, coords.csv")
    m.add_argument("--model", default="openai/clip-vit-large-patch14",
                   help="Hugging Face CLIP model name or local folder (default: CLIP ViT-L/14)")
    m.add_argument("--pretrained", choices=("weights", "none"), default="weights",
                   help="'none': the architecture with random weights, offline (for tests)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--shard-size", type=int, default=1024, help="rows per .npy shard")
    m.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="shard dtype")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    m.set_defaults(func=cmd_embed)

    b = sub.add_parser("bench", help="how to run the benchmarks")
    b.set_defaults(func=cmd_bench)
    return p


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"locdiff {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
    return show


def main(argv=None) -> int:
    from locdiff.stopping import Interrupted

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's parser ("locdiff train: error: ..."), as its other errors
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what config.json records as the command
    prefix = f"locdiff {args.command}"
    old_show = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command)
    ok = False
    try:
        code = args.func(args)
        ok = True
        return code
    except (DataError, CliError) as err:
        where = f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.is_distributed() else ""
        print(f"{prefix}: error{where}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not distributed.peer_left(err):
            raise
        print(f"{prefix}: error (rank {distributed.rank()} of {distributed.world_size()}): another process of the "
              "group stopped first; its own error line says why", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"{prefix}: {err}; any checkpoint saved before is intact", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = old_show
        distributed.shutdown(wait=ok)


if __name__ == "__main__":
    sys.exit(main())
