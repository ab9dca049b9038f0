"""A built-in synthetic language, so the default job trains offline with a known optimum.

The language is a hidden Markov model over (topic, syntactic state):

* **local syntax**: a small probabilistic sentence grammar over word classes (determiner,
  adjective, subject/object nouns, pronoun, auxiliary, verb, adverb, preposition, conjunction,
  comma, period) decides which class comes next;
* **Zipfian vocabulary**: each class emits its words with a Zipf law (exponent ~1.05), so the
  corpus's rank-frequency curve is Zipfian like natural text;
* **long-range structure**: every document draws one topic, which boosts a topic-specific subset
  of the open-class words for the whole document; predicting well late in a document requires
  inferring the topic from everything seen so far;
* documents end after a period with a fixed probability, emitting EOS.

Because the generating process is known, the Bayes-optimal next-token loss on any evaluation set
is computed exactly with the forward algorithm (:meth:`Language.optimal_nll`): it is the
source's conditional entropy, a floor that no model can beat on average, and the training
summary reports the model's gap to it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import numpy as np

PAD, EOS, UNK, PERIOD_ID, COMMA_ID = 0, 1, 2, 3, 4
N_SPECIAL = 5

# Word classes and how many closed-class words each has; open classes share the rest.
CLOSED = {"det": 8, "pron": 12, "aux": 10, "prep": 20, "conj": 8}
OPEN_SHARE = {"noun": 0.5, "verb": 0.25, "adj": 0.15, "adv": 0.10}

# Hidden states: (name, word class). Several states share a class but differ in what follows.
STATES = [
    ("det", "det"),
    ("adj", "adj"),
    ("subj", "noun"),
    ("pron", "pron"),
    ("aux", "aux"),
    ("verb", "verb"),
    ("adv", "adv"),
    ("det_o", "det"),
    ("adj_o", "adj"),
    ("obj", "noun"),
    ("prep", "prep"),
    ("det_p", "det"),
    ("pobj", "noun"),
    ("conj", "conj"),
    ("comma", "comma"),
    ("period", "period"),
    ("end", "eos"),
]
S = {name: i for i, (name, _) in enumerate(STATES)}

# Mean transition probabilities of the grammar; each language perturbs them (Dirichlet).
GRAMMAR = {
    "det": {"adj": 0.3, "subj": 0.7},
    "adj": {"adj": 0.15, "subj": 0.85},
    "subj": {"verb": 0.65, "aux": 0.35},
    "pron": {"verb": 0.6, "aux": 0.4},
    "aux": {"adv": 0.2, "verb": 0.8},
    "adv": {"verb": 0.6, "det_o": 0.25, "period": 0.15},
    "verb": {"det_o": 0.45, "adj_o": 0.1, "obj": 0.15, "prep": 0.15, "period": 0.1, "adv": 0.05},
    "det_o": {"adj_o": 0.3, "obj": 0.7},
    "adj_o": {"adj_o": 0.1, "obj": 0.9},
    "obj": {"period": 0.45, "prep": 0.25, "comma": 0.1, "conj": 0.2},
    "prep": {"det_p": 0.65, "pobj": 0.35},
    "det_p": {"pobj": 1.0},
    "pobj": {"period": 0.5, "prep": 0.15, "comma": 0.15, "conj": 0.2},
    "conj": {"pron": 0.3, "det": 0.4, "verb": 0.3},
    "comma": {"conj": 0.4, "pron": 0.3, "det": 0.3},
}
SENTENCE_START = {"det": 0.45, "adj": 0.1, "subj": 0.15, "pron": 0.2, "prep": 0.05, "adv": 0.05}

_WORD_RE = re.compile(r"[a-z]+|[.,]|\S+")


def _cdf(p: np.ndarray) -> np.ndarray:
    """Cumulative sums that end at exactly 1.0, so a uniform in [0, 1) never picks a p=0 entry."""
    c = np.cumsum(p, axis=-1)
    return c / c[..., -1:]


@dataclass(frozen=True)
class LanguageSpec:
    seed: int = 1234
    vocab_size: int = 2048
    num_topics: int = 16
    topic_weight: float = 0.6  # share of open-class mass on the document topic's words
    topic_fraction: float = 0.125  # fraction of each open class boosted by one topic
    zipf_exponent: float = 1.05
    end_prob: float = 0.12  # P(document ends | a sentence ended)
    concentration: float = 40.0  # Dirichlet concentration of the grammar perturbation


class Language:
    """The generating process: tables for sampling, scoring and rendering text."""

    def __init__(self, spec: LanguageSpec = LanguageSpec()) -> None:
        n_closed = sum(CLOSED.values())
        if spec.vocab_size < N_SPECIAL + n_closed + 4 * 16:
            raise ValueError(
                f"data.builtin_vocab_size={spec.vocab_size} is too small for the built-in "
                f"language; use at least {N_SPECIAL + n_closed + 64}"
            )
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self.class_words = self._allocate_words(spec, rng)
        self.transition, self.start = self._grammar(spec, rng)
        self.emission = self._emissions(spec, rng)  # (topics, states, vocab)
        self.V = spec.vocab_size
        self._flat_cdf = (_cdf(self.emission) + np.arange(len(STATES))[None, :, None]).reshape(
            spec.num_topics, -1
        )
        self.transition_cdf = [list(row) for row in _cdf(self.transition)]
        self.start_cdf = list(_cdf(self.start))
        self.words = self._spell(spec, rng)
        self.word_ids = {w: i for i, w in enumerate(self.words)}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _allocate_words(spec: LanguageSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids = np.arange(N_SPECIAL, spec.vocab_size)
        rng.shuffle(ids)
        out, pos = {}, 0
        for cls, n in CLOSED.items():
            out[cls], pos = ids[pos : pos + n], pos + n
        rest = ids[pos:]
        counts = [int(len(rest) * share) for share in OPEN_SHARE.values()]
        counts[0] += len(rest) - sum(counts)
        pos = 0
        for cls, n in zip(OPEN_SHARE, counts, strict=True):
            out[cls], pos = rest[pos : pos + n], pos + n
        out["comma"], out["period"], out["eos"] = (
            np.array([i]) for i in (COMMA_ID, PERIOD_ID, EOS)
        )
        return out

    @staticmethod
    def _grammar(spec: LanguageSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        def perturb(row: dict[str, float]) -> np.ndarray:
            names = list(row)
            probs = rng.dirichlet(spec.concentration * np.array([row[n] for n in names]) + 1e-3)
            out = np.zeros(len(STATES))
            out[[S[n] for n in names]] = probs
            return out

        K = len(STATES)
        trans = np.zeros((K, K))
        for name, row in GRAMMAR.items():
            trans[S[name]] = perturb(row)
        start = perturb(SENTENCE_START)
        trans[S["period"]] = (1 - spec.end_prob) * start
        trans[S["period"], S["end"]] = spec.end_prob
        # "end" restarts a document: handled by the caller (new topic), row kept for the chain.
        trans[S["end"]] = start
        return trans, start

    def _emissions(self, spec: LanguageSpec, rng: np.random.Generator) -> np.ndarray:
        T, K, V = spec.num_topics, len(STATES), spec.vocab_size
        emission = np.zeros((T, K, V))
        for k, (_, cls) in enumerate(STATES):
            words = self.class_words[cls]
            base = self._zipf(len(words), spec.zipf_exponent)
            if cls not in OPEN_SHARE:
                emission[:, k, words] = base
                continue
            n_topic = max(1, int(len(words) * spec.topic_fraction))
            for z in range(T):
                boost = np.zeros(len(words))
                chosen = rng.choice(len(words), size=n_topic, replace=False)
                boost[chosen] = self._zipf(n_topic, spec.zipf_exponent)
                emission[z, k, words] = (1 - spec.topic_weight) * base + spec.topic_weight * boost
        return emission

    @staticmethod
    def _zipf(n: int, s: float) -> np.ndarray:
        p = 1.0 / np.arange(1, n + 1) ** s
        return p / p.sum()

    def _spell(self, spec: LanguageSpec, rng: np.random.Generator) -> list[str]:
        onsets = list("bcdfghklmnprstvwz") + [
            "br",
            "ch",
            "dr",
            "gl",
            "kr",
            "pl",
            "sh",
            "st",
            "th",
            "tr",
        ]
        vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
        words = ["<pad>", "</s>", "<unk>", ".", ","]
        taken = set(words)
        lengths = {cls: (1, 2) for cls in CLOSED} | {cls: (2, 4) for cls in OPEN_SHARE}
        owner = {}
        for cls, ids in self.class_words.items():
            for i in ids:
                owner[int(i)] = cls
        for i in range(N_SPECIAL, spec.vocab_size):
            lo, hi = lengths[owner[i]]
            while True:
                n = int(rng.integers(lo, hi + 1))
                w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n))
                if rng.random() < 0.3:
                    w += rng.choice(list("nrslt"))
                if w not in taken:
                    break
            taken.add(w)
            words.append(w)
        return words

    # ------------------------------------------------------------------ sampling
    def document(self, seed: int | list[int]) -> list[int]:
        """One document's token ids (EOS last), a pure function of ``seed``."""
        rng = np.random.default_rng(seed)
        topic = int(rng.integers(self.spec.num_topics))
        states = np.asarray(self._states(rng))
        # One search over the topic's per-state CDFs laid end to end (row k shifted by k).
        u = states + rng.random(len(states))
        return (np.searchsorted(self._flat_cdf[topic], u, side="right") - states * self.V).tolist()

    def _states(self, rng: np.random.Generator) -> list[int]:
        """The hidden state path of one document: sentence grammar until the "end" state."""
        cdfs, end, draw = self.transition_cdf, S["end"], bisect.bisect_right
        k = draw(self.start_cdf, rng.random())
        states = [k]
        while k != end:
            for u in rng.random(128).tolist():
                k = draw(cdfs[k], u)
                states.append(k)
                if k == end:
                    break
        return states

    # ------------------------------------------------------------------ scoring
    def optimal_nll(
        self, rows: np.ndarray, labels_mask: np.ndarray, stationary: bool
    ) -> np.ndarray:
        """Exact -log p(x_t | x_<t of the same row) under the true process, per label position.

        ``rows`` is (R, L) token ids; ``labels_mask`` (R, L) marks positions scored (position 0
        never is: a model has no context for it). ``stationary=False`` means every row starts at a
        document start (paper layout); ``True`` means rows are windows of a packed stream and the
        hidden state at the row start follows the chain's stationary distribution.
        """
        T, K = self.spec.num_topics, len(STATES)
        prior_topic = np.full(T, 1.0 / T)
        end = S["end"]
        if stationary:
            mu = self._stationary_states()
            alpha = np.broadcast_to(np.outer(prior_topic, mu), (rows.shape[0], T, K)).copy()
        else:
            alpha = np.broadcast_to(np.outer(prior_topic, self.start), (rows.shape[0], T, K)).copy()
        nll = np.zeros(rows.shape, dtype=np.float64)
        for t in range(rows.shape[1]):
            if t > 0:
                # Predict: move one step in the chain; mass at "end" starts a new document.
                ended = alpha[:, :, end].sum(axis=1)  # (R,)
                alpha[:, :, end] = 0.0
                alpha = alpha @ self.transition
                alpha += ended[:, None, None] * np.outer(prior_topic, self.start)[None]
            emit = self.emission[:, :, rows[:, t]].transpose(2, 0, 1)  # (R, T, K)
            joint = alpha * emit
            p = joint.sum(axis=(1, 2))
            if t > 0:
                nll[:, t] = -np.log(np.maximum(p, 1e-300))
            alpha = joint / np.maximum(p, 1e-300)[:, None, None]
        return np.where(labels_mask, nll, 0.0)

    def _stationary_states(self) -> np.ndarray:
        """Stationary distribution of the state chain (topics are independent of it)."""
        vals, vecs = np.linalg.eig(self.transition.T)
        mu = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
        return mu / mu.sum()

    # ------------------------------------------------------------------ text
    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        for i in ids:
            w = self.words[i] if 0 <= i < len(self.words) else "<unk>"
            if w in (".", ",") and out:
                out[-1] += w
            else:
                out.append(w)
        return " ".join(out)

    def encode(self, text: str) -> list[int]:
        return [self.word_ids.get(w, UNK) for w in _WORD_RE.findall(text)]


def document_rows(docs: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Paper-layout rows (one document each, truncated, zero-padded) and their scored positions."""
    rows = np.zeros((len(docs), seq_len), dtype=np.int64)
    mask = np.zeros_like(rows, dtype=bool)
    for r, d in enumerate(docs):
        d = d[:seq_len]
        rows[r, : len(d)] = d
        mask[r, 1 : len(d)] = True
    return rows, mask


def describe(spec: LanguageSpec = LanguageSpec(), n_docs: int = 2000, seq_len: int = 128) -> dict:
    """Statistics of a language, for docs and sanity checks (``python -m llm_pretrain.corpus``)."""
    lang = Language(spec)
    docs = [lang.document([spec.seed, 1, i]) for i in range(n_docs)]
    counts = np.bincount(np.concatenate(docs), minlength=spec.vocab_size)
    freq = np.sort(counts)[::-1][10:1000].astype(float)
    slope = float(np.polyfit(np.log(np.arange(11, 1001)), np.log(freq + 1e-9), 1)[0])
    p = counts[counts > 0] / counts.sum()
    rows, mask = document_rows(docs, seq_len)
    nll = lang.optimal_nll(rows, mask, stationary=False)
    spans = [(1, 8), (8, 32), (32, 64), (64, seq_len)]
    return {
        "mean_document_tokens": float(np.mean([len(d) for d in docs])),
        "zipf_slope": slope,
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "optimal_loss": float(nll.sum() / mask.sum()),
        "optimal_loss_by_position": {
            f"{a}-{b - 1}": float(nll[:, a:b].sum() / mask[:, a:b].sum()) for a, b in spans
        },
        "sample": lang.decode(docs[0][:40]),
    }


if __name__ == "__main__":
    for key, value in describe().items():
        print(f"{key}: {value}")
