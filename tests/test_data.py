"""Data path round trips: exactly-once sharding, both layouts, exact resume, held-out splits."""

import gzip
import json
from collections import Counter

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from llm_pretrain.config import DataConfig
from llm_pretrain.data import TokenRows, document_source, train_loader, validation_rows
from llm_pretrain.model import IGNORE_INDEX
from llm_pretrain.tokenizer import load_tokenizer

N_DOCS = 41


def texts(lo=0, hi=N_DOCS):
    return [f"document number {i} talks about {'many ' * (i % 7)}things" for i in range(lo, hi)]


def write_jsonl_gz(path, docs):
    with gzip.open(path, "wt") as f:
        for t in docs:
            f.write(json.dumps({"text": t, "url": "u"}) + "\n")


@pytest.fixture(scope="module")
def t5(shared_data):
    return load_tokenizer(str(shared_data / "t5_tokenizer" / "spiece.model"))


@pytest.fixture
def corpora(tmp_path):
    """The same 41 documents as 3 jsonl.gz shards, one txt file and 2 parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = texts()
    for k in range(3):
        write_jsonl_gz(tmp_path / f"shard{k}.jsonl.gz", docs[k::3])
    (tmp_path / "all.txt").write_text("\n".join(docs) + "\n")
    for k in range(2):
        pq.write_table(pa.table({"text": docs[k::2]}), tmp_path / f"part{k}.parquet")
    return {
        "jsonl": str(tmp_path / "shard*.jsonl.gz"),
        "txt": str(tmp_path / "all.txt"),
        "parquet": str(tmp_path / "part*.parquet"),
    }


def one_epoch(cfg, tok, world, workers, source=None):
    """Every row each rank's loader yields in one pass over the source, per rank."""
    out = []
    for rank in range(world):
        rows = TokenRows(
            source or document_source(cfg, tok, "train"), cfg, tok, 32000, rank, world, epochs=False
        )
        loader = StatefulDataLoader(rows, batch_size=1, num_workers=workers)
        out.append([tuple(b["input_ids"][0].tolist()) for b in loader])
    return out


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_files_sharded_exactly_once(corpora, t5, kind, world, workers):
    cfg = DataConfig(
        source="files",
        tokenizer="t5",
        path=corpora[kind],
        val_path=corpora[kind],
        layout="paper",
        seq_len=32,
        shuffle_shards=False,
    )
    per_rank = one_epoch(cfg, t5, world, workers)
    got = Counter(row for rows in per_rank for row in rows)
    expected = Counter(tuple(r) for r in _paper_rows(t5, texts(), 32))
    assert got == expected  # every document once: no overlap, no loss
    if world > 1:
        assert all(rows for rows in per_rank)


def _paper_rows(tok, docs, L):
    return [(ids[:L] + [tok.pad_id] * L)[:L] for ids in tok.encode_batch(docs)]


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 3)])
def test_builtin_sharded_exactly_once(world, workers):
    tok = load_tokenizer("builtin")
    cfg = DataConfig(source="builtin", tokenizer="builtin", layout="paper", seq_len=512)
    src = document_source(cfg, tok, "train")

    class FirstN:  # the first 60 documents of the infinite stream, sharded as the source does
        def iterate(self, node, num_nodes, epoch, skip):
            for j, doc in enumerate(src.iterate(node, num_nodes, epoch, skip)):
                if node + (skip + j) * num_nodes >= 60:
                    return
                yield doc

    per_rank = one_epoch(cfg, tok, world, workers, source=FirstN())
    got = Counter(tuple(x for x in row if x) for rows in per_rank for row in rows)
    expected = Counter(tuple(tok.language.document([1234, 0, i])[:512]) for i in range(60))
    assert got == expected


def test_paper_layout_truncates_pads_and_masks(t5):
    cfg = DataConfig(source="builtin", tokenizer="builtin", layout="paper", seq_len=8)
    tok = load_tokenizer("builtin")

    class Docs:
        def iterate(self, node, num_nodes, epoch, skip):
            yield from [[5, 6, 7, 1], list(range(10, 30)) + [1]][skip:]

    rows = list(TokenRows(Docs(), cfg, tok, 2048, epochs=False))
    assert rows[0]["input_ids"].tolist() == [5, 6, 7, 1, 0, 0, 0, 0]
    assert rows[0]["labels"].tolist() == [5, 6, 7, 1] + [IGNORE_INDEX] * 4
    assert rows[1]["input_ids"].tolist() == list(range(10, 18))  # truncated, EOS lost as in GaLore
    assert rows[1]["labels"].tolist() == list(range(10, 18))


def test_packed_layout_concatenates_with_eos():
    tok = load_tokenizer("builtin")
    cfg = DataConfig(source="builtin", tokenizer="builtin", layout="packed", seq_len=16)
    src = document_source(cfg, tok, "train")
    rows = []
    for r in TokenRows(src, cfg, tok, 2048):
        rows.append(r)
        if len(rows) == 30:
            break
    stream = torch.cat([r["input_ids"] for r in rows]).tolist()
    docs = []
    i = 0
    while sum(map(len, docs)) < len(stream):
        docs.append(tok.language.document([1234, 0, i]))
        i += 1
    assert stream == sum(docs, [])[: len(stream)]
    assert all(torch.equal(r["input_ids"], r["labels"]) for r in rows)


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("layout", ["packed", "paper"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["builtin", "files", "files-by-document"])
def test_loader_resumes_exactly(tmp_path, corpora, t5, layout, workers, source):
    if source == "builtin":
        cfg, tok = (
            DataConfig(
                source="builtin",
                tokenizer="builtin",
                layout=layout,
                seq_len=24,
                num_workers=workers,
            ),
            load_tokenizer("builtin"),
        )
    else:  # 41 short documents: several epochs pass within the test
        cfg, tok = (
            DataConfig(
                source="files",
                tokenizer="t5",
                path=corpora["jsonl"],
                val_docs=5,
                layout=layout,
                seq_len=16,
                num_workers=workers,
                split="documents" if source == "files-by-document" else None,
            ),
            t5,
        )
    straight = batches(train_loader(cfg, tok, 32000, 3, rank=1, world_size=2), 40)
    first = train_loader(cfg, tok, 32000, 3, rank=1, world_size=2)
    it = iter(first)
    for _ in range(17):
        next(it)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = train_loader(cfg, tok, 32000, 3, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    rest = batches(resumed, 23)
    for a, b in zip(straight[17:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])


def test_files_hold_out_the_first_documents(corpora, t5):
    cfg = DataConfig(
        source="files", tokenizer="t5", path=corpora["txt"], val_docs=6, layout="paper", seq_len=32
    )
    val = validation_rows(cfg, t5, 32000, token_budget=10**9)
    assert [tuple(r) for r in val["input_ids"].tolist()] == [
        tuple(r) for r in _paper_rows(t5, texts(0, 6), 32)
    ]
    train = Counter(one_epoch(cfg, t5, 1, 0)[0])
    assert train == Counter(tuple(r) for r in _paper_rows(t5, texts(6, N_DOCS), 32))


def test_validation_budget_and_determinism():
    tok = load_tokenizer("builtin")
    cfg = DataConfig(source="builtin", tokenizer="builtin", layout="packed", seq_len=64)
    val = validation_rows(cfg, tok, 2048, token_budget=1000)
    assert val["input_ids"].shape == (16, 64)  # ceil(1000 / 64) rows
    assert torch.equal(val["input_ids"], validation_rows(cfg, tok, 2048, 1000)["input_ids"])
    train_first = next(iter(train_loader(cfg, tok, 2048, 16, 0, 1)))["input_ids"]
    assert not torch.equal(train_first, val["input_ids"])  # a different split


def test_c4_loader_code_path_on_local_shards(tmp_path, t5):
    """data=c4 calls load_dataset(hf_name, "en", split=..., streaming=True); a local copy of the
    allenai/c4 repository layout (README configs + en/*.json.gz shards) exercises that path."""
    (tmp_path / "en").mkdir()
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n"
        '    path: "en/c4-train.*.json.gz"\n  - split: validation\n'
        '    path: "en/c4-validation.*.json.gz"\n---\n'
    )
    write_jsonl_gz(tmp_path / "en" / "c4-train.00000-of-00002.json.gz", texts(0, 20))
    write_jsonl_gz(tmp_path / "en" / "c4-train.00001-of-00002.json.gz", texts(20, 40))
    write_jsonl_gz(tmp_path / "en" / "c4-validation.00000-of-00001.json.gz", texts(100, 104))
    cfg = DataConfig(
        source="c4",
        tokenizer="t5",
        hf_name=str(tmp_path),
        hf_config="en",
        layout="paper",
        seq_len=32,
        shuffle_shards=True,
    )
    per_rank = one_epoch(cfg, t5, 2, 0)  # 2 shards over 2 ranks: one whole shard each
    assert Counter(per_rank[0] + per_rank[1]) == Counter(
        tuple(r) for r in _paper_rows(t5, texts(0, 40), 32)
    )
    assert {len(per_rank[0]), len(per_rank[1])} == {20}
    val = validation_rows(cfg, t5, 32000, 10**9)
    assert val["input_ids"].tolist() == _paper_rows(t5, texts(100, 104), 32)


def test_token_ids_beyond_the_model_vocabulary_are_refused(corpora, t5):
    cfg = DataConfig(
        source="files", tokenizer="t5", path=corpora["txt"], layout="paper", seq_len=8, val_docs=0
    )
    rows = TokenRows(document_source(cfg, t5, "train"), cfg, t5, model_vocab=100)
    with pytest.raises(ValueError, match=r"model.vocab_size=100"):
        next(iter(rows))


def test_bad_data_settings_are_explained(tmp_path, t5):
    def first(cfg):
        return next(iter(train_loader(cfg, t5, 32000, 2, 0, 1)))

    with pytest.raises(FileNotFoundError, match=r"data.path=.*nothing\*.jsonl: no file matches"):
        first(DataConfig(source="files", tokenizer="t5", path=str(tmp_path / "nothing*.jsonl")))
    with pytest.raises(ValueError, match="data.source=files needs data.path"):
        first(DataConfig(source="files", tokenizer="t5"))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="supported: .jsonl .json .txt .parquet"):
        first(DataConfig(source="files", tokenizer="t5", path=str(tmp_path / "x.csv")))
    write_jsonl_gz(tmp_path / "three.jsonl.gz", texts(0, 3))
    with pytest.raises(ValueError, match="data.val_docs=200 documents are held out"):
        first(DataConfig(source="files", tokenizer="t5", path=str(tmp_path / "three.jsonl.gz")))
    write_jsonl_gz(tmp_path / "empty.jsonl.gz", [])
    with pytest.raises(ValueError, match=r"empty\.jsonl\.gz is empty; remove it"):
        first(
            DataConfig(
                source="files",
                tokenizer="t5",
                path=str(tmp_path / "empty.jsonl.gz"),
                val_path=str(tmp_path / "empty.jsonl.gz"),
            )
        )
    with gzip.open(tmp_path / "body.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(KeyError, match="set data.text_field"):
        first(
            DataConfig(
                source="files", tokenizer="t5", path=str(tmp_path / "body.jsonl.gz"), val_docs=0
            )
        )
    with pytest.raises(ValueError, match="data.source=builtin needs data.tokenizer=builtin"):
        first(DataConfig(source="builtin", tokenizer="t5"))
    with pytest.raises(ValueError, match="data.layout='rows'"):
        first(
            DataConfig(
                source="files", tokenizer="t5", path=str(tmp_path / "three.jsonl.gz"), layout="rows"
            )
        )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["builtin", "files"])
def test_a_stream_resplit_over_another_world_size_continues_the_global_order(
    corpora, t5, workers, source
):
    """2 ranks take 8 rows each, then 3 ranks continue: together they yield the documents one
    rank would have read, each once (paper layout: one document per row; with 2 workers, each
    worker of a rank yields every other batch, so 4 batches leave them all at 4 documents).
    Files split by document (data.split=documents) re-split as the built-in corpus does."""
    from llm_pretrain.data import resplit

    if source == "builtin":
        cfg = DataConfig(
            source="builtin", tokenizer="builtin", layout="paper", seq_len=24, num_workers=workers
        )
        tok = load_tokenizer("builtin")
    else:
        cfg = DataConfig(
            source="files",
            tokenizer="t5",
            path=corpora["jsonl"],
            val_docs=5,
            layout="paper",
            seq_len=24,
            num_workers=workers,
            split="documents",
        )
        tok = t5
    single = [
        tuple(r.tolist())
        for b in batches(train_loader(cfg, tok, 32000, 2, 0, 1), 14)
        for r in b["input_ids"]
    ]
    saved, before = [], []
    for rank in range(2):
        loader = train_loader(cfg, tok, 32000, 2, rank, 2)
        it = iter(loader)
        before += [tuple(r.tolist()) for _ in range(4) for r in next(it)["input_ids"]]
        saved.append(loader.state_dict())
    after = []
    for rank in range(3):
        loader = train_loader(cfg, tok, 32000, 2, rank, 3)
        resplit(loader, saved, cfg, "ckpt")
        after += [tuple(r.tolist()) for b in batches(loader, 2) for r in b["input_ids"]]
    assert Counter(before) == Counter(single[:16])
    assert Counter(after) == Counter(single[16:28])


def test_a_stream_split_by_shards_is_not_resplit(corpora, t5):
    from llm_pretrain.data import resplit

    cfg = DataConfig(source="files", tokenizer="t5", path=corpora["jsonl"], val_docs=5)
    loader = train_loader(cfg, t5, 32000, 2, 0, 3)
    with pytest.raises(ValueError, match="resume on the same number of ranks.*data.split=doc"):
        resplit(loader, [{}, {}], cfg, "ckpt")


def test_a_resplit_across_an_epoch_end_restarts_the_next_epoch_at_its_first_document(corpora, t5):
    """Saved: node 0 already in epoch 1, node 1 at document 17 of epoch 0 (36 train documents).
    Epoch 0 resumes at 2 x 17 = 34 on 3 nodes: nodes 0 and 1 take its last two documents,
    node 2 none (not an error), and epoch 1 starts from document 0 on every node."""
    from llm_pretrain.data import NodeState, resplit

    cfg = DataConfig(
        source="files",
        tokenizer="t5",
        path=corpora["jsonl"],
        val_docs=5,
        layout="paper",
        seq_len=24,
        split="documents",
    )
    order = [
        tuple(r.tolist())
        for b in batches(train_loader(cfg, t5, 32000, 1, 0, 1), 40)
        for r in b["input_ids"]
    ]
    assert order[36:] == order[:4]  # (one rank: the second epoch repeats the first)
    saved = [
        {"dataset_state": {"epoch": 1, "docs": 2, "carry": [], "base": 0}},
        {"dataset_state": {"epoch": 0, "docs": 17, "carry": [], "base": 0}},
    ]
    for node, expect in [(0, [34, 0, 3]), (1, [35, 1, 4]), (2, [2, 5, 8])]:
        loader = train_loader(cfg, t5, 32000, 1, node, 3)
        resplit(loader, saved, cfg, "ckpt")
        assert loader.dataset.state == NodeState(0, 0, [], 34)
        got = [tuple(b["input_ids"][0].tolist()) for b in batches(loader, 3)]
        assert got == [order[i] for i in expect], node


@pytest.mark.parametrize(
    "source, split, match",
    [
        ("files", "rows", "data.split='rows': use one of"),
        ("builtin", "shards", "built-in corpus has no shards"),
    ],
)
def test_a_wrong_data_split_is_refused_by_name(source, split, match):
    from llm_pretrain.data import split_mode

    with pytest.raises(ValueError, match=match):
        split_mode(DataConfig(source=source, tokenizer="builtin", split=split))
