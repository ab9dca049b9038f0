import json

import pytest

from llm_pretrain.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

FOX = "The quick brown fox jumps over the lazy dog."


def test_t5_sentencepiece_ids_match_the_reference(shared_data):
    tok = load_tokenizer(str(shared_data / "t5_tokenizer" / "spiece.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (32000, 0, 1)
    assert tok.encode_batch([FOX]) == [
        [37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5, 1]
    ]
    assert tok.decode(tok.encode_batch([FOX])[0][:-1]) == FOX


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [FOX, "a lazy cat"] * 5,
        trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "[UNK]"]),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"})
    )
    return tmp_path


def test_hf_tokenizer_directory_and_file(hf_tokenizer_dir):
    for spec in (hf_tokenizer_dir, hf_tokenizer_dir / "tokenizer.json"):
        tok = load_tokenizer(str(spec))
        assert isinstance(tok, HFTokenizer)
        assert (tok.pad_id, tok.eos_id) == (0, 1)
        ids = tok.encode_batch(["a lazy dog"])[0]
        assert ids[-1] == 1 and len(ids) == 4
        assert tok.decode(ids[:-1]) == "a lazy dog"


def test_builtin_tokenizer_round_trip():
    tok = load_tokenizer("builtin")
    doc = tok.language.document([1, 0, 0])
    assert tok.encode_batch([tok.decode(doc[:-1])]) == [doc]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("/nonexistent/spiece.model", "no such SentencePiece model file"),
        ("/nonexistent/tokenizer.json", "no such tokenizer.json file"),
        ("./not/here", "not a SentencePiece .model"),
    ],
)
def test_missing_tokenizer_files_are_explained(spec, match):
    with pytest.raises(FileNotFoundError, match=match):
        load_tokenizer(spec)


def test_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
