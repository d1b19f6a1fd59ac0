"""The datasets of a training command: read (their columns renamed as ``data.columns`` says),
checked, tokenized, reported, kept in the examples cache when they are large, and mixed when
``data.train`` is a list (:mod:`preftune.data.mixture`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from preftune.commands.common import (
    make_accelerator,
    maybe_lora,
    model_spec,
    train_and_save,
)
from preftune.commands.configs import RunConfig
from preftune.data.cache import Stored, cacheable, stored
from preftune.data.check import describe_skipped
from preftune.data.chunked import Recipe
from preftune.data.encode import Budget, TruncationReport
from preftune.data.mixture import Mixture, mixed, source_list
from preftune.data.sources import Columns
from preftune.data.streamed import ROW_READERS
from preftune.errors import ConfigError, DataError, PreftuneError
from preftune.models.load import load_model, load_tokenizer
from preftune.models.refcache import cache_root
from preftune.objectives.base import Objective
from preftune.shares import decide_on_main, on_every_node
from preftune.train import placement
from preftune.train.run_dir import claimed

Records = TypeVar("Records")
Records_co = TypeVar("Records_co", covariant=True)
Records_contra = TypeVar("Records_contra", contravariant=True)
Example = TypeVar("Example")


class Load(Protocol[Records_co]):
    """A reader of :mod:`preftune.data.readers` (``load_pairs``, …): a dataset's records and
    its layout, its columns renamed."""

    def __call__(
        self, spec: str, split: str, skipped: list[DataError] | None, columns: Columns | None, /
    ) -> tuple[Records_co, str]: ...


class Encode(Protocol[Records_contra, Example]):
    """An encoder of :mod:`preftune.data.encode` (``encode_pairs``, …) that takes the records
    of its reader."""

    def __call__(
        self,
        records: Records_contra,
        tokenizer: PreTrainedTokenizerBase,
        budget: Budget,
        /,
        *,
        source: str = ...,
        skipped: list[DataError] | None = ...,
    ) -> tuple[list[Example], TruncationReport]: ...


def train_and_eval_sets(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    acc: Accelerator,
    load: Load[Records],
    encode: Encode[Records, Example],
) -> tuple[Sequence[Example], Sequence[Example] | None]:
    """``data.train`` and ``data.eval`` (None when unset), each source read with ``load`` and
    encoded with ``encode`` (:func:`encoded_dataset`); the sources of a list are mixed as
    ``data.weights`` says (the eval sources concatenated) and the mixture described in a line."""
    train_set = _encoded_sources(cfg, tokenizer, "train", acc, load, encode)
    if train_set is None:
        raise ConfigError("data.train is required: a data file, directory or hub dataset")
    eval_set = _encoded_sources(cfg, tokenizer, "eval", acc, load, encode)
    return train_set, eval_set


def _encoded_sources(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    acc: Accelerator,
    load: Load[Records],
    encode: Encode[Records, Example],
) -> Sequence[Example] | None:
    """The examples of ``data.<key>`` (``train`` or ``eval``): its one source's, or its
    sources' mixed (:func:`~preftune.data.mixture.mixed`); None when it is unset."""
    names = source_list(cfg.data.train if key == "train" else cfg.data.eval)
    if not names:
        return None
    split, weights = ("train", cfg.data.weights) if key == "train" else ("test", None)
    parts = [encoded_dataset(cfg, tokenizer, name, split, acc, load, encode) for name in names]
    examples = mixed(parts, weights, cfg.seed)
    if isinstance(examples, Mixture):
        acc.print(examples.describe(f"data.{key}", names))
    return examples


def encoded_dataset(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    split: str,
    acc: Accelerator,
    load: Load[Records],
    encode: Encode[Records, Example],
) -> Sequence[Example]:
    """Read (its columns renamed as ``data.columns`` says), validate and tokenize one dataset,
    reporting what truncation did to it and, with ``data.on_error=skip``, which malformed rows
    were left out and why.

    A local source of ``preftune.data.cache.MIN_BYTES`` or more is read once, by the main
    process, into the examples cache, which every process then maps from disk
    (:func:`_cached_examples`); a smaller one is read into memory by each process."""
    columns = cfg.data.columns
    read = ROW_READERS.get(load)
    if read is not None and cacheable(source, tokenizer):
        recipe = Recipe(read, encode, tokenizer, cfg.data.budget(), columns)
        found = _cached_examples(cfg, source, split, acc, recipe)
        _describe(acc, source, found.layout, found.report, found.skipped_errors())
        return found.examples()
    skipped: list[DataError] | None = [] if cfg.data.on_error == "skip" else None
    records, layout = load(source, split, skipped, columns)
    examples, report = encode(records, tokenizer, cfg.data.budget(), source=source, skipped=skipped)
    _describe(acc, source, layout, report, skipped or [])
    return examples


def _cached_examples(
    cfg: RunConfig, source: str, split: str, acc: Accelerator, recipe: Recipe
) -> Stored:
    """The examples cache's entry for ``source``, in ``examples/`` beside the reference cache
    (``speed.cache_dir`` where the command has it, else ``$PREFTUNE_CACHE``, else
    ``~/.cache/preftune``). The main process reads or computes it while the others wait; on a
    node that does not see it there (a disk of its own), the node's first process makes the
    node's copy. Every process then maps the entry from its own node's disk."""
    speed = getattr(cfg, "speed", None)
    directory = cache_root(speed.cache_dir if speed is not None else None).parent / "examples"

    def store() -> Stored:
        try:
            return stored(
                source,
                split,
                recipe,
                directory,
                collect=cfg.data.on_error == "skip",
                num_proc=cfg.data.num_proc,
                say=acc.print if acc.is_main_process else _say_here(acc),
            )
        except OSError as error:  # the disk, not a bug: one line, on every process
            where = f"{error.filename}: " if error.filename else ""
            raise PreftuneError(
                f"{source}: examples cache: {where}{error.strerror or error}"
            ) from None

    found = decide_on_main(acc, store)
    here = replace(found, path=directory / found.path.name)
    on_every_node(acc, here.complete, store)
    return here


def _say_here(acc: Accelerator) -> Callable[[str], None]:
    """Print a line from this process, naming it."""
    return lambda line: print(f"[process {acc.process_index}] {line}", flush=True)


def _describe(
    acc: Accelerator,
    source: str,
    layout: str,
    report: TruncationReport,
    skipped: list[DataError],
) -> None:
    """The dataset's start line, the rows left out, and an error when none is left."""
    acc.print(f"{source}: layout {layout}; {report.summary()}")
    if skipped:
        acc.print(describe_skipped(source, skipped))
    _check_not_empty(source, report, skipped)


def _check_not_empty(source: str, report: TruncationReport, skipped: list[DataError]) -> None:
    if report.rows == 0 and skipped:
        message = f"no usable rows: all {len(skipped)} are malformed; the first: {skipped[0]}"
        raise DataError(source, message)
    if report.kept == 0:
        raise ConfigError(f"{source}: no rows left after truncation; raise data.max_length")


def train_on_dataset(
    cfg: RunConfig,
    command: str,
    load: Load[Records],
    encode: Encode[Records, Example],
    objective: Callable[[PreTrainedTokenizerBase], Objective],
    reward: bool = False,
) -> dict[str, float]:
    """The whole of a command that trains one model (a reward model with ``reward``) on
    ``data.train`` read with ``load`` and ``encode``, with the objective ``objective(tokenizer)``
    makes: claim ``output_dir``, read the data, load, adapt and shard the model, train, save."""
    acc = make_accelerator(cfg)
    with claimed(cfg.output_dir, acc):
        tokenizer = load_tokenizer(model_spec(cfg))
        train_set, eval_set = train_and_eval_sets(cfg, tokenizer, acc, load, encode)
        base = load_model(model_spec(cfg), tokenizer, reward=reward)
        model = maybe_lora(cfg, base, "SEQ_CLS" if reward else "CAUSAL_LM")
        model = placement.shard(model, acc, cfg.train)
        made = objective(tokenizer)
        return train_and_save(cfg, command, acc, model, tokenizer, made, train_set, eval_set)
