import numpy as np
import pytest

from llm_pretrain.corpus import EOS, Language, LanguageSpec, document_rows


@pytest.fixture(scope="module")
def lang() -> Language:
    return Language(LanguageSpec(seed=7, vocab_size=512))


def test_documents_are_pure_functions_of_their_seed(lang):
    assert lang.document([7, 0, 3]) == lang.document([7, 0, 3])
    assert lang.document([7, 0, 3]) != lang.document([7, 0, 4])
    assert Language(LanguageSpec(seed=7, vocab_size=512)).document([1]) == lang.document([1])
    doc = lang.document([7, 0, 5])
    assert doc[-1] == EOS and EOS not in doc[:-1]


def test_vocabulary_is_zipfian():
    lang = Language(LanguageSpec(seed=3, vocab_size=2048))
    counts = np.bincount(
        np.concatenate([lang.document([3, 0, i]) for i in range(1500)]), minlength=2048
    )
    freq = np.sort(counts)[::-1][10:1000].astype(float)
    slope = np.polyfit(np.log(np.arange(11, 1001)), np.log(freq + 1e-9), 1)[0]
    assert -1.3 < slope < -0.7


def test_predictive_distribution_sums_to_one(lang):
    prefix = lang.document([7, 0, 11])[:6]
    V = lang.spec.vocab_size
    rows = np.array([prefix + [v] for v in range(V)])
    mask = np.zeros_like(rows, dtype=bool)
    mask[:, -1] = True
    for stationary in (False, True):
        nll = lang.optimal_nll(rows, mask, stationary)[:, -1]
        assert np.isclose(np.exp(-nll).sum(), 1.0, atol=1e-9)


def test_optimal_loss_is_an_entropy_with_long_range_structure(lang):
    docs = [lang.document([7, 1, i]) for i in range(400)]
    rows, mask = document_rows(docs, 96)
    nll = lang.optimal_nll(rows, mask, stationary=False)
    h = nll.sum() / mask.sum()
    counts = np.bincount(rows[mask], minlength=lang.spec.vocab_size) / mask.sum()
    unigram = -(counts[counts > 0] * np.log(counts[counts > 0])).sum()
    assert 2.0 < h < unigram - 1.0  # syntax makes the source far more predictable than unigrams
    early = nll[:, 1:8].sum() / mask[:, 1:8].sum()
    late = nll[:, 48:].sum() / mask[:, 48:].sum()
    assert late < early - 0.2  # the document topic, inferred from context, keeps helping


def test_packed_windows_score_from_the_stationary_state(lang):
    stream = np.concatenate([lang.document([7, 2, i]) for i in range(300)])
    L = 64
    rows = stream[: len(stream) // L * L].reshape(-1, L)
    mask = np.ones_like(rows, dtype=bool)
    mask[:, 0] = False
    h_stationary = lang.optimal_nll(rows, mask, stationary=True).sum() / mask.sum()
    h_doc_start = lang.optimal_nll(rows, mask, stationary=False).sum() / mask.sum()
    assert h_stationary < h_doc_start  # a wrong prior costs, the right one does not


def test_text_round_trip(lang):
    ids = lang.document([7, 0, 2])
    text = lang.decode(ids)
    assert text.endswith("</s>")
    assert lang.encode(text) == ids


def test_tiny_vocabulary_is_refused():
    with pytest.raises(ValueError, match="data.builtin_vocab_size=50"):
        Language(LanguageSpec(vocab_size=50))
