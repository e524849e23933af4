"""Token lengths of a data set without torch or transformers (``pip install 'zeroplan[data]'``).

Records are read and turned into conversations by ``zeroplan.records`` — the functions the
training side uses — then rendered with the model's chat template the way transformers'
``apply_chat_template`` renders it (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the loop-control extension, ``{% generation %}`` blocks, ``tojson``,
``raise_exception``, ``strftime_now`` and the tokenizer's special tokens as variables) and
tokenized by the Rust ``tokenizers`` library from the model's ``tokenizer.json`` (what a fast
transformers tokenizer wraps). Chat records are tokenized without added special tokens (the
template writes them); ``text`` records with them, plus EOS, as ``launch/data.py`` does. A
test holds the lengths equal to ``zeroplan.launch.data.prepare``'s.

Where the tokenizer comes from: ``--tokenizer`` (a folder or a tokenizer.json), the model's
own folder, the Hugging Face cache, or (online) the Hub's ``tokenizer.json`` and
``tokenizer_config.json``, kept in zeroplan's cache. The lengths are cached too, keyed by the
data file's bytes, the tokenizer, the template, the format and the system prompt, so
re-planning the same data is instant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.errors import (
    BadDataError,
    ChatTemplateError,
    MissingExtraError,
    TokenizerNotFoundError,
)
from zeroplan.lengths import LengthProfile
from zeroplan.models import cached_file, hf_cache_dirs, hub_offline, hub_request
from zeroplan.outputs import write_atomic
from zeroplan.prompts import BOS, EOS, Piece, PromptFormat
from zeroplan.records import check_file_type, detect_format, read_records, rendered

CACHE_VERSION = 3  # bump when the rendering changes what a cached length means (3: empty text 0)
ENCODE_CHUNK = 4096  # texts per call to the tokenizer
PROGRESS_FROM = 5000  # records: fewer tokenize in well under a second, without a word
_SPECIAL = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


def cache_dir() -> Path:
    """``$ZEROPLAN_CACHE``, else ``$XDG_CACHE_HOME/zeroplan``, else ``~/.cache/zeroplan``."""
    if os.environ.get("ZEROPLAN_CACHE"):
        return Path(os.environ["ZEROPLAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zeroplan"


# --------------------------------------------------------------------------- the tokenizer


def find_tokenizer(model: str, hub_id: str | None, tokenizer: str | None = None) -> Path:
    """The folder holding ``tokenizer.json`` for ``model``; TokenizerNotFoundError naming
    every place looked in."""
    looked: list[str] = []
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        folder = path.parent if path.name == "tokenizer.json" else path
        if (folder / "tokenizer.json").is_file():
            return folder
        raise TokenizerNotFoundError(
            f"--tokenizer {tokenizer}: no tokenizer.json there; give a model folder or a "
            "tokenizer.json file"
        )
    path = Path(model).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if (folder / "tokenizer.json").is_file():
            return folder
        looked.append(str(folder))
    repo = hub_id if hub_id and hub_id.count("/") == 1 else None
    if repo is not None:
        cached = cached_file(repo, "tokenizer.json")
        if cached is not None:
            return cached.parent
        looked.append(f"the Hugging Face cache ({hf_cache_dirs()[0]})")
        ours = cache_dir() / "tokenizers" / repo.replace("/", "--")
        if (ours / "tokenizer.json").is_file():
            return ours
        if not hub_offline() and _download_tokenizer(repo, ours):
            return ours
        looked.append("the Hub (offline)" if hub_offline() else "the Hub (unreachable or gated)")
    raise TokenizerNotFoundError(
        f"no tokenizer for {model}: looked in {', '.join(looked) or 'nothing'}; pass "
        "--tokenizer DIR (a folder with tokenizer.json), or a model folder as MODEL"
    )


def _download_tokenizer(repo: str, dest: Path, timeout: float = 10.0) -> bool:
    """tokenizer.json, tokenizer_config.json (and chat_template.jinja if there) from the Hub."""
    got: dict[str, bytes] = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        try:
            with urllib.request.urlopen(hub_request(repo, name), timeout=timeout) as resp:
                got[name] = resp.read()
        except (urllib.error.URLError, OSError, ValueError):
            if name == "tokenizer.json":
                return False
    dest.mkdir(parents=True, exist_ok=True)
    for name, body in got.items():
        write_atomic(dest / name, body)
    return True


@dataclass(frozen=True)
class LightTokenizer:
    """A fast tokenizer and its chat template, loaded without transformers."""

    folder: Path
    template: str | None
    special: dict[str, str]  # bos_token, eos_token, … as the template sees them
    # texts, add_special → (length, last token id) of each
    encode_batch: Callable[[list[str], bool], list[tuple[int, int]]]
    eos_id: int | None
    fingerprint: str  # hash of tokenizer.json, tokenizer_config.json and the template


def load_tokenizer(
    folder: Path, chat_template: str | None = None, added: tuple[str, ...] = ()
) -> LightTokenizer:
    """The tokenizer in ``folder``; ``added``: special tokens a trainer adds to it (one token
    each: LLaMA-Factory's stop words under ``replace_eos``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingExtraError(
            "planning from a data file needs the tokenizers package: pip install 'zeroplan[data]'"
        ) from None
    tok_file = folder / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # the Rust library raises its own exception type
        raise TokenizerNotFoundError(f"{tok_file}: not a readable tokenizer ({exc})") from None
    if added:
        tok.add_special_tokens(list(added))
    config: dict[str, Any] = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TokenizerNotFoundError(f"{cfg_file}: not JSON ({exc})") from None
    template = chat_template
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        raw = config.get("chat_template")
        if isinstance(raw, list):  # named templates: the default one trains
            raw = next((t.get("template") for t in raw if t.get("name") == "default"), None)
        template = raw if isinstance(raw, str) else None
    special = {}
    for key in _SPECIAL:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    eos = special.get("eos_token")
    eos_id = tok.token_to_id(eos) if eos else None

    def encode_batch(texts: list[str], add_special: bool) -> list[tuple[int, int]]:
        out = []
        # in chunks: a whole data set's Encoding objects (ids, offsets, masks) at once take
        # gigabytes; the library parallelises within each chunk
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start : start + ENCODE_CHUNK]
            for e in tok.encode_batch(chunk, add_special_tokens=add_special):
                ids = e.ids
                out.append((len(ids), ids[-1] if ids else -1))
        return out

    digest = hashlib.sha256(tok_file.read_bytes())
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update((template or "").encode())
    digest.update("\0".join(added).encode())
    return LightTokenizer(folder, template, special, encode_batch, eos_id, digest.hexdigest())


def compile_template(template: str) -> Any:
    """A Jinja template compiled as transformers compiles chat templates."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MissingExtraError(
            "rendering chat templates needs jinja2: pip install 'zeroplan[data]'"
        ) from None

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}`` renders its body (transformers marks
        the assistant's tokens with it; the text is the same)."""

        tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a class-level set)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


# --------------------------------------------------------------------------- the lengths


def _data_digest(source: str) -> str | None:
    path = Path(source).expanduser()
    if not path.is_file():
        return None  # a Hub data set: not cached (its files are in datasets' own cache)
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_lengths(
    source: str,
    tokenizer: LightTokenizer,
    fmt: str = "auto",
    system: str | None = None,
    split: str = "train",
    progress: Callable[[str], None] | None = None,
    prompt: PromptFormat | None = None,
) -> tuple[LengthProfile, bool]:
    """The profile of ``source`` and whether it came from the cache. ``prompt``: the
    trainer's own way of writing a record (``zeroplan.prompts``), used where it reads the
    records' format; otherwise the chat template (the profile's ``rendered`` says which)."""
    digest = _data_digest(source)
    key = None
    if digest is not None:
        # the cache is keyed by the bytes: a copy named .txt would hit the .jsonl's entry
        check_file_type(source)
        parts = [str(CACHE_VERSION), digest, tokenizer.fingerprint, fmt, system or "", split]
        parts.append(prompt.key if prompt is not None else "")
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
        cached = cache_dir() / "lengths" / f"{key}.json"
        if cached.is_file():
            try:
                data = json.loads(cached.read_text(encoding="utf-8"))
                profile = LengthProfile(
                    source,
                    data["format"],
                    str(tokenizer.folder),
                    tuple(data["lengths"]),
                    packs=dict(data.get("packs", {})),
                    cache_file=str(cached),
                    rendered=str(data["rendered"]),
                )
                return profile, True
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a broken cache entry is recomputed
    records = read_records(source, split)
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    if progress is not None and len(records) >= PROGRESS_FROM:
        progress(f"tokenizing {len(records):,} {fmt} records of {source} (cached afterwards)")
    how = RENDERED_TEMPLATE
    if prompt is not None and prompt.reads(fmt):
        # records are numbered from 1 in messages (zeroplan.records)
        pieces = [prompt.pieces(r, fmt, i, system) for i, r in enumerate(records, 1)]
        lengths = piece_lengths(pieces, tokenizer)
        how = prompt.name
        marker = prompt.template.marker if prompt.template is not None else ""
        if marker and marker not in (tokenizer.template or ""):
            # the trainer writes its template's markers whatever the tokenizer's own template
            # (measured: LLaMA-Factory's llama3 turns on a tokenizer without them)
            how += f", whose {marker} turns the tokenizer's chat template lacks"
    elif fmt == "text":
        # launch/data.py appends EOS unless the tokenizer already ended with it, and drops
        # an empty text (None: nothing to learn): length 0, which the plan drops too
        plain = [t if isinstance(t, str) else None for t in rendered(records, fmt, system)]
        eos = tokenizer.eos_id
        encoded = tokenizer.encode_batch([t or "" for t in plain], True)
        lengths = [
            n + int(eos is not None and last != eos) if text is not None else 0
            for text, (n, last) in zip(plain, encoded, strict=True)
        ]
        how = "plain text + EOS"
    else:
        if not tokenizer.template:
            raise ChatTemplateError(
                f"the tokenizer in {tokenizer.folder} has no chat template, and {fmt} records are "
                "rendered with one: use an instruct model's tokenizer, pass --chat-template "
                "FILE.jinja, or give plain text records"
            )
        compiled = compile_template(tokenizer.template)
        texts = []
        for i, messages in enumerate(rendered(records, fmt, system), 1):
            try:
                texts.append(
                    compiled.render(
                        messages=messages, add_generation_prompt=False, **tokenizer.special
                    )
                )
            except Exception as exc:  # jinja2's TemplateError ("roles must alternate") and kin
                raise BadDataError(f"record {i}: the chat template refused it: {exc}") from None
        lengths = [n for n, _ in tokenizer.encode_batch(texts, False)]
    profile = LengthProfile(source, fmt, str(tokenizer.folder), tuple(lengths), rendered=how)
    if key is not None:
        folder = cache_dir() / "lengths"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            data = {"format": fmt, "lengths": lengths, "rendered": how}
            write_atomic(folder / f"{key}.json", json.dumps(data))
            profile = dataclasses.replace(profile, cache_file=str(folder / f"{key}.json"))
        except OSError:
            pass  # no cache: the next plan tokenizes again
    return profile, False


RENDERED_TEMPLATE = "the chat template"


def piece_lengths(records: list[list[Piece]], tokenizer: LightTokenizer) -> list[int]:
    """Tokens of each record written as pieces (``zeroplan.prompts``): every text piece
    tokenized on its own, with or without the tokenizer's special tokens as the piece says,
    and one token for each BOS / EOS piece the tokenizer has a token for."""
    lengths = [0] * len(records)
    for add_special in (False, True):
        owner = []
        texts = []
        for i, pieces in enumerate(records):
            for text, add in pieces:
                if add is add_special and text and text not in (BOS, EOS):
                    owner.append(i)
                    texts.append(text)
        for i, (n, _) in zip(owner, tokenizer.encode_batch(texts, add_special), strict=True):
            lengths[i] += n
    has = {BOS: "bos_token" in tokenizer.special, EOS: "eos_token" in tokenizer.special}
    for i, pieces in enumerate(records):
        lengths[i] += sum(1 for text, _ in pieces if has.get(text, False))
    return lengths


def save_packs(profile: LengthProfile) -> None:
    """Keep the packings a plan computed beside the profile's cached lengths."""
    if profile.cache_file is None or not profile.packs:
        return
    path = Path(profile.cache_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("packs") == profile.packs:
            return
        data["packs"] = profile.packs
        write_atomic(path, json.dumps(data))
    except (OSError, ValueError):
        pass


def profile_data(
    source: str,
    model: str,
    hub_id: str | None,
    tokenizer: str | None = None,
    chat_template: str | None = None,
    fmt: str = "auto",
    system: str | None = None,
    split: str = "train",
    progress: Callable[[str], None] | None = None,
    prompt: PromptFormat | None = None,
) -> tuple[LengthProfile, bool]:
    """Find the model's tokenizer, then the token lengths of ``source`` (cached), written as
    ``prompt`` where it reads them."""
    template = None
    if chat_template is not None:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise BadDataError(f"no chat template file {chat_template}")
        template = path.read_text(encoding="utf-8")
    folder = find_tokenizer(model, hub_id, tokenizer)
    added = prompt.added_tokens if prompt is not None else ()
    return token_lengths(
        source, load_tokenizer(folder, template, added), fmt, system, split, progress, prompt
    )
