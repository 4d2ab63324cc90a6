"""Readers that turn the mirror's raw files into documents, each tagged with its source and its source's own
label.

Toxic-bearing readers yield (text, toxic) with the annotation that ships with the data: Davidson class hate or
offensive, TweetEval offensive / hate = 1, a Stormfront post with any hate sentence, a ToxiGen `hate_` file, a
Reddit ChangeMyView thread that ends in an ad hominem attack (`_ah_`), any 4chan /pol/ thread. Benign readers
yield plain texts, labelled not toxic (WebText pages included: their profanity is unlabelled, as in web
pre-training data). A reader yields SKIPPED for a record it cannot read whole (the cut last line of the
WebText head); prepare counts them. `file_documents` reads a user's own files (data.corpus).
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import logging
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from ..config import CorpusInput
from ..errors import IfguideError
from .sources import registry, source_path

log = logging.getLogger(__name__)

CHUNK_CHARS = 1500
SKIPPED = None  # what a reader yields for a record that is not whole (counted by prepare, never a document)


def _chunks(paragraphs: list[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Group consecutive paragraphs into documents of about `size` characters."""
    buf: list[str] = []
    length = 0
    for para in paragraphs:
        para = para.strip()
        if not para:
            continue
        buf.append(para)
        length += len(para)
        if length >= size:
            yield "\n".join(buf)
            buf, length = [], 0
    if buf:
        yield "\n".join(buf)


def _zip_texts(name: str, keep: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(source_path(name)) as archive:
        for member in sorted(archive.namelist()):
            if not member.endswith("/") and keep(member):
                yield member, archive.read(member).decode("utf-8", errors="replace")


def bold_wiki() -> Iterator[str]:
    for name in sorted(k for k in registry() if k.startswith("bold/wikipedia/")):
        for people in json.loads(source_path(name).read_text()).values():
            for sentences in people.values():
                yield " ".join(s.strip() for s in sentences)


def _nltk_plain(corpus: str) -> Callable[[], Iterator[str]]:
    def read() -> Iterator[str]:
        for _, text in _zip_texts(f"nltk/{corpus}.zip", lambda m: not m.endswith(("README", ".xml"))):
            paragraphs = r"\n\s*\n|\n" if corpus == "webtext" else r"\n\s*\n"
            yield from _chunks(re.split(paragraphs, text))
    return read


def nltk_brown() -> Iterator[str]:
    for _, text in _zip_texts("nltk/brown.zip", lambda m: re.search(r"/c[a-r]\d\d$", m) is not None):
        paragraphs = []
        for para in re.split(r"\n\s*\n", text):
            words = [w.rsplit("/", 1)[0] for w in para.split()]
            sentence = " ".join(words).replace("``", '"').replace("''", '"')
            paragraphs.append(re.sub(r" ([.,;:?!'])", r"\1", sentence))
        yield from _chunks(paragraphs)


def shakespeare() -> Iterator[str]:
    yield from _chunks(re.split(r"\n\s*\n", source_path("text/tinyshakespeare.txt").read_text()))


def davidson() -> Iterator[tuple[str, bool]]:
    with open(source_path("davidson/labeled_data.csv"), newline="") as handle:
        for row in csv.DictReader(handle):
            text = row["tweet"].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
            yield text, row["class"] in ("0", "1")  # 0 hate, 1 offensive, 2 neither


def _tweeteval(task: str) -> Callable[[], Iterator[tuple[str, bool]]]:
    def read() -> Iterator[tuple[str, bool]]:
        for split in ("train", "val", "test"):
            texts = source_path(f"tweeteval/{task}/{split}_text.txt").read_text().splitlines()
            labels = source_path(f"tweeteval/{task}/{split}_labels.txt").read_text().splitlines()
            yield from ((text.strip(), label.strip() == "1") for text, label in zip(texts, labels)
                        if text.strip())
    return read


def stormfront() -> Iterator[tuple[str, bool]]:
    posts: dict[str, list[tuple[str, bool]]] = {}
    for line in source_path("stormfront/stormfront.jsonl").open():
        record = json.loads(line)
        posts.setdefault(record["file_id"].rsplit("_", 1)[0], []).append((record["text"].strip(),
                                                                         record["label"] == "hate"))
    for sentences in posts.values():
        yield " ".join(text for text, _ in sentences), any(hate for _, hate in sentences)


def toxigen_demos() -> Iterator[tuple[str, bool]]:
    for name in sorted(k for k in registry() if k.startswith("toxigen/demonstrations/")):
        hate = Path(name).name.startswith("hate_")
        for line in source_path(name).read_text().splitlines():
            line = line.strip().lstrip("-").strip()
            if line:
                yield line, hate


def webtext() -> Iterator[str | None]:
    """OpenAI WebText pages, one document each; the mirror's file is a byte-cut head, so its last line is
    SKIPPED."""
    with open(source_path("webtext/webtext.train.head.jsonl"), encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                yield SKIPPED


def reddit_cmv() -> Iterator[tuple[str, bool]]:
    """Reddit ChangeMyView comment chains, one document per thread (comments joined in order); a thread whose
    file name holds `_ah_` ends in an ad hominem attack and is labelled toxic."""
    threads = {}
    with tarfile.open(source_path("reddit_cmv/sampled-threads-ah-delta-context3.tar.bz2"),
                      "r:bz2") as archive:
        for member in archive:  # in archive order: a bz2 stream cannot seek back cheaply
            if member.isfile():
                threads[member.name] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    for name in sorted(threads):
        bodies = [json.loads(line).get("body", "").strip() for line in threads[name].splitlines()
                  if line.strip()]
        yield "\n\n".join(b for b in bodies if b), "_ah_" in Path(name).name


def pol_4chan() -> Iterator[tuple[str, bool]]:
    """Whole 4chan /pol/ threads (Paloma's 4chan part), each labelled toxic: hateful throughout."""
    with gzip.open(source_path("pol_4chan/4chan_00000000.jsonl.gz"), "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)["text"], True


# name -> (reader, toxic-bearing?); toxic-bearing readers yield (text, label), the others plain texts
CORPORA: dict[str, tuple[Callable[[], Iterator], bool]] = {
    "bold_wiki": (bold_wiki, False),
    "nltk_abc": (_nltk_plain("abc"), False),
    "nltk_brown": (nltk_brown, False),
    "nltk_inaugural": (_nltk_plain("inaugural"), False),
    "nltk_movie_reviews": (_nltk_plain("movie_reviews"), False),
    "nltk_state_union": (_nltk_plain("state_union"), False),
    "nltk_webtext": (_nltk_plain("webtext"), False),
    "shakespeare": (shakespeare, False),
    "webtext": (webtext, False),
    "davidson": (davidson, True),
    "tweeteval_offensive": (_tweeteval("offensive"), True),
    "tweeteval_hate": (_tweeteval("hate"), True),
    "stormfront": (stormfront, True),
    "toxigen_demos": (toxigen_demos, True),
    "reddit_cmv": (reddit_cmv, True),
    "pol_4chan": (pol_4chan, True),
}


def labelled_documents(source: str) -> Iterator[tuple[str, bool] | None]:
    """(text, toxic label) of every document of a source (benign sources are labelled not toxic), or
    SKIPPED."""
    reader, toxic_bearing = CORPORA[source]
    for item in reader():
        yield item if toxic_bearing or item is SKIPPED else (item, False)


def is_toxic_bearing(source: str) -> bool:
    """Whether a corpus source is one of the toxic-bearing ones (Hub sources count as benign)."""
    return source in CORPORA and CORPORA[source][1]


def wikitext_test(max_chars: int) -> str:
    """The start of WikiText-2 test, for held-out perplexity."""
    return source_path("wikitext2/test.txt").read_text()[:max_chars]


def blocklist() -> list[str]:
    """The LDNOOBW English blocklist that C4 used to drop documents."""
    return [w.strip() for w in source_path("blocklists/ldnoobw_en.txt").read_text().splitlines() if w.strip()]


RTP_FILES = ("rtp/decodingtrust_toxic.jsonl", "rtp/decodingtrust_nontoxic.jsonl", "rtp_more/quark_val.jsonl")


def rtp_records() -> list[dict]:
    """RealToxicityPrompts records (prompt + continuation with Perspective scores) of DecodingTrust's two
    files and Quark's validation file, each prompt once (the first file that holds it wins)."""
    records: dict[str, dict] = {}
    for name in RTP_FILES:
        for line in source_path(name).open(encoding="utf-8"):
            if line.strip():
                record = json.loads(line)
                records.setdefault(record["prompt"]["text"], record)
    return list(records.values())


def bold_prompts() -> list[str]:
    prompts = []
    for name in sorted(k for k in registry() if k.startswith("bold/prompts/")):
        for people in json.loads(source_path(name).read_text()).values():
            for texts in people.values():
                prompts += [t.strip() for t in texts]
    return prompts


def toxigen_statements() -> list[tuple[str, bool]]:
    """ToxiGen seed lines as (text with real newlines, is_hate)."""
    out = []
    for name in sorted(k for k in registry() if k.startswith("toxigen/prompts/")):
        is_hate = Path(name).name.startswith("hate_")
        for line in source_path(name).read_text().splitlines():
            if line.strip():
                out.append((line.replace("\\n", "\n").strip(), is_hate))
    return out


def attaq_questions() -> list[dict]:
    """AttaQ's adversarial questions as {"prompt", "category"} (the harm category is its `label` column)."""
    with open(source_path("attaq/attaq_dataset.csv"), newline="", encoding="utf-8") as handle:
        return [{"prompt": row["input"].strip(), "category": row["label"]} for row in csv.DictReader(handle)
                if row["input"].strip()]


def lambada_passages() -> list[str]:
    """LAMBADA test passages (OpenAI's detokenised split); the target is each passage's last word."""
    with source_path("lambada/lambada_test.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def _label(value: object, where: str) -> bool:
    """A per-document label: true/false, or a score in [0, 1] where >= 0.5 means toxic; anything else (NaN, a
    class index such as Davidson's 2) is refused rather than guessed."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if not 0.0 <= float(value) <= 1.0:  # also NaN
            raise IfguideError(f"{where}: label {value!r} is not a score in [0, 1]; map class indices and "
                               "missing labels to true/false first")
        return float(value) >= 0.5
    raise IfguideError(f"{where}: label {value!r} is neither true/false nor a number")


def _text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise IfguideError(f"{where}: field '{field}' is {type(value).__name__}, not text")
    return value


def _jsonl(file: Path, spec: CorpusInput) -> Iterator[tuple[str, bool]]:
    with open(file, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{file} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise IfguideError(f"{where} is not JSON") from None
            if not isinstance(row, dict) or spec.text_field not in row:
                fields = ", ".join(row) if isinstance(row, dict) else "not an object"
                raise IfguideError(f"{where} has no '{spec.text_field}' field ({fields}); set text_field")
            if spec.label_field and spec.label_field not in row:
                raise IfguideError(f"{where} has no '{spec.label_field}' field; fix label_field")
            label = _label(row[spec.label_field], where) if spec.label_field else False
            yield _text(row[spec.text_field], where, spec.text_field), label


def _txt(file: Path, spec: CorpusInput) -> Iterator[tuple[str, bool]]:
    text = file.read_text(encoding="utf-8")
    for document in (re.split(r"\n\s*\n", text) if spec.txt_split == "paragraph" else [text]):
        yield document.strip(), False


def _columns(names: list[str], file: Path, spec: CorpusInput) -> list[str]:
    """The columns to read, or a one-line error naming a missing one."""
    wanted = [spec.text_field] + ([spec.label_field] if spec.label_field else [])
    for name in wanted:
        if name not in names:
            raise IfguideError(f"{file} has no column '{name}' (columns: {', '.join(names)}); "
                               "set text_field / label_field")
    return wanted


def _rows(batches: Iterator[dict], file: Path, spec: CorpusInput) -> Iterator[tuple[str, bool]]:
    for batch in batches:
        labels = batch[spec.label_field] if spec.label_field else [False] * len(batch[spec.text_field])
        for text, label in zip(batch[spec.text_field], labels):
            yield _text(text, str(file), spec.text_field), _label(label, str(file))


def _parquet(file: Path, spec: CorpusInput) -> Iterator[tuple[str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except pa.ArrowInvalid as exc:
        raise IfguideError(f"{file} is not a readable Parquet file ({str(exc)[:80]})") from None
    columns = _columns(parquet.schema_arrow.names, file, spec)
    yield from _rows((b.to_pydict() for b in parquet.iter_batches(batch_size=1024, columns=columns)), file,
                     spec)


def _arrow(folder: Path, spec: CorpusInput) -> Iterator[tuple[str, bool]]:
    from datasets import Dataset, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise IfguideError(f"{folder} is not a `datasets` save_to_disk folder ({str(exc)[:80]})") from None
    if not isinstance(dataset, Dataset):
        raise IfguideError(f"{folder} holds several splits ({', '.join(dataset)}); point path at "
                           "one split's folder")
    columns = _columns(dataset.column_names, folder, spec)
    yield from _rows(dataset.select_columns(columns).iter(batch_size=1024), folder, spec)


FILE_READERS = {"jsonl": _jsonl, "txt": _txt, "parquet": _parquet, "arrow": _arrow}


def corpus_files(spec: CorpusInput) -> list[Path]:
    """The paths a data.corpus input's `path` matches, sorted: the path itself when it exists (even with `[`
    `]` in its name), else its glob matches, each real file once (a symlink loop is not followed round). For a
    format other than arrow, folders a glob matches are left out and a folder given by name is refused."""
    literal = Path(spec.path)
    if literal.exists():
        if literal.is_dir() and spec.format != "arrow":
            raise IfguideError(f"data.corpus '{spec.source}': {spec.path} is a folder; give a file or a glob "
                               f"such as {spec.path.rstrip('/')}/*.{spec.format}")
        return [literal]
    files, seen = [], set()
    for name in sorted(glob.glob(spec.path, recursive=True)):
        path = Path(name)
        if path.is_dir() and spec.format != "arrow":
            continue
        try:
            real = path.resolve(strict=True)
        except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
            raise IfguideError(f"data.corpus '{spec.source}': {path} is a broken link or a symlink loop; "
                               "point path at real files") from None
        if real not in seen:
            seen.add(real)
            files.append(path)
    return files


def matched_files(spec: CorpusInput) -> list[Path]:
    """`corpus_files`, refusing an input that matches no file (checked before any heavy import, and again
    here)."""
    files = corpus_files(spec)
    if not files:
        raise IfguideError(f"data.corpus '{spec.source}': no file matches {spec.path!r} "
                           "(relative paths start at the current directory)")
    return files


def file_documents(spec: CorpusInput, empty_files: Counter | None = None) -> Iterator[tuple[str, bool]]:
    """(text, toxic label) of every document of a data.corpus input, file by file in sorted order; a file that
    holds no document is warned about and counted in `empty_files[source]`."""
    files = matched_files(spec)
    for file in files:
        documents = 0
        try:
            for document in FILE_READERS[spec.format](file, spec):
                documents += bool(document[0].strip())
                yield document
        except UnicodeDecodeError:
            raise IfguideError(f"{file} is not UTF-8 text") from None
        except OSError as exc:
            raise IfguideError(f"cannot read {file}: {exc.strerror or exc}") from None
        if not documents:
            log.warning(f"prepare: {file} holds no document; it adds nothing to '{spec.source}'")
            if empty_files is not None:
                empty_files[spec.source] += 1
