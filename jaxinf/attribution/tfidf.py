"""TF-IDF candidate filtering (Grosse et al. 2023 pre-filter training data with TF-IDF before gradient work).

Documents are strings (tokenised into lower-case words, regex \\w+) or sequences of tokens (e.g. token ids).
The index is fitted on the training documents:

    tf(t, d)  = count of t in d          (or 1 + ln count with sublinear_tf)
    idf(t)    = ln((1 + N) / (1 + df(t))) + 1      (N training documents, df = #documents containing t)
    x_d       = tf(., d) * idf / || tf(., d) * idf ||_2,

queries use the training idf (terms unseen in training are dropped), and similarity = cosine = x_q . x_n.
`tfidf_candidates` returns, per query, the top-M training rows by similarity (ties in a seeded random order).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from jaxinf.attribution.scores import top_k_indices

_WORD = re.compile(r"\w+", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Lower-case word tokens (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


def row_texts(rows: Sequence[dict], part: str = "all") -> list[str]:
    """Texts of rows ({"prompt", "response"}): part = "prompt", "response" or "all" (prompt + " " + response)."""
    pick = {"prompt": lambda r: r["prompt"], "response": lambda r: r["response"],
            "all": lambda r: r["prompt"] + " " + r["response"]}
    if part not in pick:
        raise ValueError(f"part must be one of {sorted(pick)}, got {part!r}")
    return [pick[part](r) for r in rows]


def token_id_docs(tokenized, part: str = "all") -> list[list[int]]:
    """Token-id documents of a `TokenizedRows`: real tokens of the prompt (t <= prompt_end), response, or all."""
    out = []
    for ids, mask, pe in zip(tokenized.input_ids, tokenized.attention_mask, tokenized.prompt_end):
        real = np.flatnonzero(mask)
        keep = {"all": real, "prompt": real[real <= pe], "response": real[real > pe]}[part]
        out.append([int(i) for i in ids[keep]])
    return out


def _tokens(doc) -> list:
    return word_tokens(doc) if isinstance(doc, str) else list(np.asarray(doc).tolist())


@dataclasses.dataclass(frozen=True)
class TfidfIndex:
    """Vocabulary (term -> column), idf [V] and the L2-normalised training matrix [N, V] (CSR)."""

    vocabulary: dict
    idf: np.ndarray
    matrix: sp.csr_matrix
    sublinear_tf: bool = False

    @classmethod
    def fit(cls, docs: Sequence, *, sublinear_tf: bool = False) -> "TfidfIndex":
        token_lists = [_tokens(d) for d in docs]
        vocab: dict = {}
        for toks in token_lists:
            for t in toks:
                vocab.setdefault(t, len(vocab))
        counts = _counts(token_lists, vocab)
        df = np.bincount(counts.indices, minlength=len(vocab))
        idf = np.log((1.0 + len(docs)) / (1.0 + df)) + 1.0
        return cls(vocab, idf, _weight(counts, idf, sublinear_tf), sublinear_tf)

    def transform(self, docs: Sequence) -> sp.csr_matrix:
        """L2-normalised tf-idf rows of `docs` with this index's vocabulary and idf (unknown terms dropped)."""
        return _weight(_counts([_tokens(d) for d in docs], self.vocabulary), self.idf, self.sublinear_tf)

    def similarities(self, docs: Sequence) -> np.ndarray:
        """Cosine similarities [len(docs), N] to the training documents."""
        return np.asarray((self.transform(docs) @ self.matrix.T).todense())


def _counts(token_lists, vocab) -> sp.csr_matrix:
    rows, cols = [], []
    for i, toks in enumerate(token_lists):
        for t in toks:
            j = vocab.get(t)
            if j is not None:
                rows.append(i)
                cols.append(j)
    data = np.ones(len(rows))
    m = sp.csr_matrix((data, (rows, cols)), shape=(len(token_lists), len(vocab)))
    m.sum_duplicates()
    return m


def _weight(counts: sp.csr_matrix, idf: np.ndarray, sublinear: bool) -> sp.csr_matrix:
    m = counts.astype(np.float64).tocsr(copy=True)
    if sublinear:
        m.data = 1.0 + np.log(m.data)
    m = m @ sp.diags(idf)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1))).ravel()
    norms[norms == 0] = 1.0  # empty documents stay zero vectors (similarity 0 to everything)
    return sp.csr_matrix(sp.diags(1.0 / norms) @ m)


def tfidf_candidates(query_docs: Sequence, train_docs: Sequence, top_m: int, *, sublinear_tf: bool = False,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, M], similarities [Q, M]): the top-M training documents per query by TF-IDF cosine.

    Feed `indices` to `jaxinf.attribution.candidate_scores` to compute gradient scores for those rows only.
    """
    index = TfidfIndex.fit(train_docs, sublinear_tf=sublinear_tf)
    sims = index.similarities(query_docs)
    idx = top_k_indices(sims, top_m, seed=seed)
    return idx, np.take_along_axis(sims, idx, axis=1)
