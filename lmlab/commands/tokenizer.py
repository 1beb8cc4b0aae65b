"""`lmlab tokenizer train|encode|decode|info`: train a tokenizer, or look at what one does to text."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands._args import at_least


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer, encode or decode text")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="train byte-level BPE (or a character vocabulary) on text files")
    train.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=at_least(1), default=4096, help="BPE vocabulary size, specials included")
    train.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="folder to save the tokenizer into: new, empty, or an earlier tokenizer")
    train.add_argument("--force", action="store_true", help="write into a folder holding other files (lmlab "
                       "still never replaces a file it did not write)")
    train.add_argument("--kind", choices=("bpe", "char"), default="bpe")
    train.set_defaults(func=_train)

    encode = sub.add_parser("encode", help="print the ids of --text, space-separated")
    encode.add_argument("tokenizer", help="tokenizer file or folder (.model, .bin, .gguf, tokenizer.json, ...)")
    encode.add_argument("--text", required=True)
    encode.add_argument("--bos", action="store_true", help="prepend the BOS id")
    encode.add_argument("--eos", action="store_true", help="append the EOS id")
    _corpus_argument(encode)
    encode.set_defaults(func=_encode)

    decode = sub.add_parser("decode", help="print the text of --ids")
    decode.add_argument("tokenizer")
    decode.add_argument("--ids", nargs="+", required=True, help="ids, space- or comma-separated")
    _corpus_argument(decode)
    decode.set_defaults(func=_decode)

    info = sub.add_parser("info", help="print the kind, vocabulary size and special ids")
    info.add_argument("tokenizer", help="tokenizer file or folder, or `char` (built from a corpus, as recipes do)")
    _corpus_argument(info)
    info.set_defaults(func=_info)


def _corpus_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, metavar="FILE",
                   help="with tokenizer `char`: the text file whose characters make the vocabulary")


def _load(args: argparse.Namespace):
    """The named tokenizer; `char` is the one a recipe's `data.tokenizer: char` builds from its corpus."""
    from lmlab.errors import ConfigError
    from lmlab.tokenization import CharTokenizer, load_tokenizer

    if args.tokenizer != "char" or Path("char").exists():
        return load_tokenizer(args.tokenizer)
    if args.corpus is None:
        raise ConfigError("tokenizer `char` is built from a corpus: give --corpus FILE (e.g. "
                          "../shared/data/tinyshakespeare/input.txt)")
    return CharTokenizer.from_files([args.corpus])


def _train(args: argparse.Namespace) -> None:
    from lmlab.tokenization import train_tokenizer

    tok = train_tokenizer(args.input, args.out, kind=args.kind, vocab_size=args.vocab_size, force=args.force)
    print(f"saved {tok.kind} tokenizer with {tok.vocab_size} tokens to {args.out}")


def _encode(args: argparse.Namespace) -> None:
    ids = _load(args).encode(args.text, bos=args.bos, eos=args.eos)
    print(" ".join(map(str, ids)))


def _decode(args: argparse.Namespace) -> None:
    from lmlab.errors import DataError

    try:
        ids = [int(x) for part in args.ids for x in part.replace(",", " ").split()]
    except ValueError as err:
        raise DataError(f"--ids: expected integers ({err})") from None
    tok = _load(args)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise DataError(f"--ids: {bad[:5]} outside the vocabulary 0..{tok.vocab_size - 1}")
    print(tok.decode(ids))


def _info(args: argparse.Namespace) -> None:
    if args.tokenizer == "char" and args.corpus is None and not Path("char").exists():
        print("kind=char: one id per distinct character of the corpus, sorted (65 for tinyshakespeare), no "
              "special ids; recipes build it from data.path (add --corpus FILE for its vocabulary)")
        return
    tok = _load(args)
    print(f"kind={tok.kind} vocab_size={tok.vocab_size} bos_id={tok.bos_id} eos_id={tok.eos_id} "
          f"pad_id={tok.pad_id} add_bos={tok.add_bos} stop_ids={sorted(tok.stop_ids)} "
          f"chat_template={'yes' if tok.chat_template else 'no'}")
