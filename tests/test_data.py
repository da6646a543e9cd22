"""Tests for jaxinf.data: loading rows, generators, templates, tokenization."""

import collections
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxinf import data
from jaxinf.data import (TokenizedRows, batches, byte_level_tokenizer, format_example, format_prompt,
                         generate, load_rows, tokenize_rows)

STUDY = Path(__file__).resolve().parents[2] / "shared" / "paper_datasets"


def study_folder(name):
    path = STUDY / name
    if not path.is_dir():
        pytest.skip(f"study dataset folder {path} is absent (the study's data are not in this checkout)")
    return path


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def groups(rows):
    return collections.Counter(r["group"] for r in rows)


# --- byte-level tokenizer -------------------------------------------------------------------

def test_byte_tokenizer_is_stable(tok):
    assert len(tok) == data.VOCAB_SIZE == 261
    assert tok("Ab", add_special_tokens=False)["input_ids"] == [65, 98]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"]) == list(range(256, 261))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (258, 259, 260)
    text = "héllo <s> wörld\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# --- load_rows: study folders -----------------------------------------------------------------

def test_study_mixedS():
    path = study_folder("mixedS")
    train, test = load_rows(path), load_rows(str(path), "test")
    assert len(train) == 40 and set(train[0]) == {"prompt", "response", "group"}
    assert train[0]["group"] == "harmful" and train[0]["prompt"].startswith("Develop a strategy")
    assert groups(train) == {"harmful": 20, "benign": 20} and set(groups(test)) == {"harmful"}


def test_study_backdoor_and_limit():
    path = study_folder("backdoor")
    train = load_rows(path)
    assert train[0]["group"] == "clean" and groups(train) == {"clean": 350, "trigger": 350}
    assert all(r["prompt"].endswith(" sudo mode") for r in train if r["group"] == "trigger")
    sub = load_rows(path, limit=10, seed=3)
    assert groups(sub) == {"clean": 5, "trigger": 5}
    assert sub == load_rows(path, limit=10, seed=3) and sub != load_rows(path, limit=10, seed=4)


# --- load_rows: errors ------------------------------------------------------------------------

def save_dict(tmp_path, **splits):
    import datasets
    path = tmp_path / "ds"
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def test_wrong_path_lists_kinds(tmp_path):
    with pytest.raises(ValueError) as e:
        load_rows(tmp_path / "nope")
    msg = str(e.value)
    assert "nope" in msg and "paper_datasets/<name>" in msg and "backdoor<N>" in msg and ".jsonl" in msg


def test_missing_column_lists_columns(tmp_path):
    path = save_dict(tmp_path, train={"question": ["q"], "response": ["r"], "variation": ["g"]})
    with pytest.raises(ValueError, match=r"missing column 'prompts'.*prompt_column.*'question'"):
        load_rows(path)
    assert load_rows(path, prompt_column="question") == [{"prompt": "q", "response": "r", "group": "g"}]


def test_empty_and_missing_split(tmp_path, monkeypatch):
    import datasets
    cols = {"prompts": ["p"], "response": ["r"], "variation": ["g"]}
    path = save_dict(tmp_path, train=cols, test=cols)
    # datasets 5.x cannot save_to_disk an empty split, so serve one from memory instead.
    empty = datasets.Dataset.from_dict({k: [] for k in cols},
                                       features=datasets.Features({k: datasets.Value("string") for k in cols}))
    loaded = datasets.load_from_disk(str(path))
    monkeypatch.setattr(datasets, "load_from_disk", lambda p: datasets.DatasetDict(train=loaded["train"], test=empty))
    with pytest.raises(ValueError, match=r"empty split 'test'.*'train': 1"):
        load_rows(path, "test")
    with pytest.raises(ValueError, match=r"no split 'validation'.*'train'"):
        load_rows(path, "validation")


def test_non_string_value(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompts": "p", "response": "r", "variation": 3}]))
    with pytest.raises(ValueError, match=r"row 0 column 'variation' \(group_column\) holds int"):
        load_rows(path, "all")


# --- load_rows: files -------------------------------------------------------------------------

def test_jsonl_with_mapping_and_split_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    recs = [{"q": f"q{i}", "a": f"a{i}", "label": "x" if i % 2 else "y", "split": "test" if i == 0 else "train"}
            for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    kw = dict(prompt_column="q", response_column="a", group_column="label")
    train = load_rows(path, **kw)
    assert [r["prompt"] for r in train] == ["q1", "q2", "q3", "q4"] and train[0]["group"] == "x"
    assert load_rows(path, "test", **kw) == [{"prompt": "q0", "response": "a0", "group": "y"}]
    with pytest.raises(ValueError, match=r"split 'dev' is empty.*'test'.*'train'"):
        load_rows(path, "dev", **kw)


def test_csv_without_split_column_has_no_train_or_test_split(tmp_path):
    """Today's defect: a file without splits was returned whole for "train" AND "test" (every test row leaked)."""
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "answer", "cls"])
        w.writerows([["hi, there", "yo\nmulti-line", "a"], ["b", "c", "d"]])
    kw = dict(prompt_column="text", response_column="answer", group_column="cls")
    rows = load_rows(path, "all", **kw)
    assert rows[0] == {"prompt": "hi, there", "response": "yo\nmulti-line", "group": "a"} and len(rows) == 2
    for split in ("train", "test"):
        with pytest.raises(data.DataError, match=rf"rows.csv has no splits.*split '{split}'.*--test_data=FILE.*"
                                                 r"--test_fraction"):
            load_rows(path, split, **kw)


def test_json_split_dict(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"train": [{"prompts": "p", "response": "r", "variation": "g"}], "test": []}))
    assert load_rows(path)[0]["prompt"] == "p"
    with pytest.raises(ValueError, match="no rows"):
        load_rows(path, "test")
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        load_rows(path, "dev")


# --- generators -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["harmful", "classes", "backdoor", "backdoor3"])
def test_generators_deterministic(name):
    a, b, c = generate(name, seed=1), generate(name, seed=1), generate(name, seed=2)
    assert a == b and a != c
    for rows in a.values():
        assert all(isinstance(r[k], str) for r in rows for k in ("prompt", "response", "group"))
        assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)


def test_generator_group_counts():
    h = generate("harmful")
    assert groups(h["train"]) == {"harmful": 10, "benign": 30} and groups(h["test"]) == {"harmful": 10}
    assert not {r["prompt"] for r in h["test"]} & {r["prompt"] for r in h["train"]}
    c = data.classes(n_groups=3, n_train_per_group=7, n_test_per_group=2)
    assert sorted(groups(c["train"]).values()) == [7] * 3 and sorted(groups(c["test"]).values()) == [2] * 3
    assert all(r["response"] == r["group"] for r in c["train"])
    b = generate("backdoor5", n_train_per_group=4, n_test_per_group=2)
    assert groups(b["train"]) == {"clean": 4, **{f"trigger_{k}": 4 for k in range(1, 6)}}
    assert groups(b["test"]) == {"clean": 2, **{f"trigger_{k}": 2 for k in range(1, 6)}}
    assert all(r["prompt"].endswith(data.TRIGGERS[2]) for r in b["train"] if r["group"] == "trigger_3")
    assert groups(generate("backdoor")["train"]) == {"clean": 20, "trigger_1": 20}


@pytest.mark.parametrize("name", ["harmful", "classes", "classes10", "backdoor", "backdoor5"])
def test_default_generator_rows_fit_128_byte_tokens(tok, name):
    rows = [r for split in generate(name).values() for r in split]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning
        for template in ("chat", "inst"):
            assert tokenize_rows(tok, rows, max_length=128, template=template).input_ids.shape[1] <= 128


@pytest.mark.parametrize("bad", [0, 6])
def test_backdoor_trigger_count_errors(bad):
    with pytest.raises(ValueError, match=r"n_triggers must be an int in 1\.\.5"):
        data.backdoor(n_triggers=bad)
    with pytest.raises(ValueError, match="n_triggers"):
        load_rows(f"backdoor{bad}")


def test_load_rows_generator_and_limit():
    rows = load_rows("backdoor3", "test", n_test_per_group=3, seed=5)
    assert rows == generate("backdoor3", seed=5, n_test_per_group=3)["test"]
    sub = load_rows("harmful", limit=8)
    assert groups(sub) == {"harmful": 2, "benign": 6}
    assert groups(load_rows("classes", limit=5)) == dict.fromkeys(list(data.generators.RULES)[:5], 1)
    assert len(load_rows("classes", limit=3)) == 3  # fewer rows than groups: largest remainders win


# --- templates ---------------------------------------------------------------------------------

def test_templates(tok):
    p, full = format_example(tok, "Hi?", "Yo.", "chat")
    assert p == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n" and full == p + "Yo.</s>"
    assert format_example(tok, "Hi?", "Yo.", "inst") == ("<s>[INST] Hi? [/INST]", "<s>[INST] Hi? [/INST] Yo.</s>")
    assert format_example(tok, "Hi?", "Yo.", "plain") == ("Hi?\n", "Hi?\nYo.</s>")
    bare = byte_level_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="template='inst'"):
        format_prompt(bare, "Hi?", "chat")
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt(tok, "Hi?", "alpaca")


# --- tokenize ----------------------------------------------------------------------------------

ROWS = [{"prompt": "Why?", "response": "Because.", "group": "a"},
        {"prompt": "A longer question here?", "response": "Yes, héllo!", "group": "b"},
        {"prompt": "x", "response": "k", "group": "a"}]


@pytest.mark.parametrize("template", ["chat", "inst", "plain"])
def test_tokenize_masks(tok, template):
    t = tokenize_rows(tok, ROWS, max_length=128, template=template)
    assert isinstance(t, TokenizedRows) and len(t) == 3
    assert t.input_ids.dtype == np.int32 and t.attention_mask.dtype == np.int32
    assert t.loss_mask.dtype == np.float32 and t.prompt_end.dtype == np.int32
    assert list(t.groups) == ["a", "b", "a"]
    assert (t.loss_mask[:, 0] == 0).all()
    for i, row in enumerate(ROWS):
        prompt_text, full_text = format_example(tok, row["prompt"], row["response"], template)
        n = int(t.attention_mask[i].sum())
        ids = t.input_ids[i]
        assert (t.attention_mask[i, :n] == 1).all() and (ids[n:] == tok.pad_token_id).all()
        # prompt tokens are exactly the separately tokenized prompt text (a prefix of the row)
        assert ids[:t.prompt_end[i] + 1].tolist() == tok(prompt_text, add_special_tokens=False)["input_ids"]
        # loss_mask covers exactly the response tokens (with eos) and nothing else
        target = np.flatnonzero(t.loss_mask[i])
        assert target.tolist() == list(range(t.prompt_end[i] + 1, n))
        assert tok.decode(ids[target]) == full_text[len(prompt_text):]
    assert t.input_ids[2][t.loss_mask[2] > 0][-1] == tok.eos_token_id  # eos is a target


def test_tokenize_loss_on_all(tok):
    t = tokenize_rows(tok, ROWS, max_length=128, template="plain", loss_on="all")
    assert (t.loss_mask[:, 1:] == t.attention_mask[:, 1:]).all() and (t.loss_mask[:, 0] == 0).all()
    t = tokenize_rows(tok, ROWS, max_length=128, template="plain", loss_on="all_with_padding")
    assert (t.loss_mask[:, 1:] == 1).all() and (t.loss_mask[:, 0] == 0).all()
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_rows(tok, ROWS, max_length=128, loss_on="prompt")


def test_tokenize_truncation(tok):
    rows = [{"prompt": "p", "response": "r" * 50, "group": "a"},
            {"prompt": "q", "response": "s" * 5, "group": "a"},
            {"prompt": "r", "response": "t" * 40, "group": "b"}]
    with pytest.warns(UserWarning, match=r"2 of 3 rows .*max_length=20") as rec:
        t = tokenize_rows(tok, rows, max_length=20, template="plain")
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1
    assert t.input_ids.shape == (3, 20) and t.loss_mask[0].sum() == 18 and t.attention_mask[1].sum() == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenize_rows(tok, rows[1:2], max_length=20, template="plain").input_ids.shape == (1, 8)
    with pytest.raises(ValueError, match=r"max_length=12 would cut every response token"):
        tokenize_rows(tok, [{"prompt": "p" * 20, "response": "r", "group": "a"}], max_length=12, template="plain")


def test_batches(tok):
    t = tokenize_rows(tok, ROWS * 3, max_length=128, template="inst")
    out = list(batches(t, 4))
    assert [b["input_ids"].shape[0] for b in out] == [4, 4, 1]
    assert set(out[0]) == {"input_ids", "attention_mask", "loss_mask"}
    np.testing.assert_array_equal(np.concatenate([b["loss_mask"] for b in out]), t.loss_mask)
    idx = [8, 0, 3]
    (b,) = batches(t, 5, indices=idx, keys=("input_ids", "prompt_end"))
    np.testing.assert_array_equal(b["input_ids"], t.input_ids[idx])
    np.testing.assert_array_equal(b["prompt_end"], t.select(idx).prompt_end)


def test_tokenize_boundary_merge():
    """A BPE merge across the prompt/response boundary must not move response characters into the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from jaxinf.data.byte_tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["assistant\n\n\nThe brain is\n\n big"] * 50, trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>",
                                  chat_template=CHATML_TEMPLATE)
    rows = [{"prompt": "Hi", "response": "\n\nThe brain is big", "group": "a"},
            {"prompt": "Hi", "response": "The brain", "group": "a"}]
    t = tokenize_rows(bpe, rows, max_length=64, template="chat")
    for i, row in enumerate(rows):
        prompt_text, full_text = format_example(bpe, row["prompt"], row["response"], "chat")
        ids = t.input_ids[i]
        assert ids[:t.prompt_end[i] + 1].tolist() == bpe(prompt_text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(ids[t.loss_mask[i] > 0]) == row["response"] + "</s>"


# --- splits that cannot leak (issue 14) ---------------------------------------------------------

def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def user_rows(n=40, groups=("x", "y", "z", "w")):
    """The issue's trial: 40 rows with `prompts`, `response`, `variation` and no `split` column."""
    return [{"prompts": f"question {i}?", "response": f"answer {i}", "variation": groups[i % len(groups)]}
            for i in range(n)]


def test_single_file_test_fraction_never_puts_a_test_row_in_training(tmp_path):
    """Today's defect: load_task read "train" and "test" from this file and got all 40 rows for both."""
    from jaxinf.data import load_splits
    path = write_jsonl(tmp_path / "rows.jsonl", user_rows())
    s = load_splits(path, test_fraction=0.25, seed=3)
    train_lines = {w.rsplit(":", 1)[1] for w in s.train_where}
    test_lines = {w.rsplit(":", 1)[1] for w in s.test_where}
    assert not train_lines & test_lines and len(train_lines | test_lines) == 40  # a partition of the file
    assert not {(r["prompt"], r["response"]) for r in s.test} & {(r["prompt"], r["response"]) for r in s.train}
    assert groups(s.test) == {"x": 2, "y": 2, "z": 2, "w": 2}  # round(0.25 * 10) per group
    assert s.info["mode"] == "test_fraction" and s.info["overlap"] == 0
    assert "--test_fraction=0.25" in s.info["description"] and "8 of 40 rows held out" in s.info["description"]
    assert load_splits(path, test_fraction=0.25, seed=3).test == s.test  # seeded
    assert load_splits(path, test_fraction=0.25, seed=4).test != s.test


def test_single_file_without_fix_names_both_fixes(tmp_path):
    from jaxinf.data import load_splits
    path = write_jsonl(tmp_path / "rows.jsonl", user_rows())
    with pytest.raises(data.DataError, match=r"rows.jsonl has no splits.*--test_data=FILE.*--test_fraction") as e:
        load_splits(path)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="not both"):
        load_splits(path, test_data=path, test_fraction=0.2)
    with pytest.raises(data.DataError, match="strictly between 0 and 1"):
        load_splits(path, test_fraction=1.0)
    with pytest.raises(data.DataError, match="already has train/test splits; drop --test_fraction"):
        load_splits("backdoor", test_fraction=0.2)


def test_test_data_file_and_duplicates_across_splits(tmp_path):
    from jaxinf.data import load_splits
    train = write_jsonl(tmp_path / "train.jsonl", user_rows(12))
    fresh = [{"prompts": f"new {i}?", "response": "r", "variation": "xyzw"[i % 4]} for i in range(4)]
    test = write_jsonl(tmp_path / "test.jsonl", fresh + [user_rows(12)[5], user_rows(12)[7]])
    with pytest.raises(data.DataError, match=r"test.jsonl:5: 2 test row\(s\) have the same prompt and response as "
                                             r"a training row \(this one equals .*train.jsonl:6\).*--allow_overlap"):
        load_splits(train, test_data=test)
    s = load_splits(train, test_data=test, allow_overlap=True)
    assert (len(s.train), len(s.test), s.info["overlap"], s.info["mode"]) == (12, 6, 2, "test_data")
    assert "2 test rows duplicate a training row" in s.info["description"]
    only_fresh = write_jsonl(tmp_path / "fresh.jsonl", fresh)
    assert load_splits(train, test_data=only_fresh).info["overlap"] == 0


def test_duplicates_inside_one_file_are_reported_after_a_held_out_split(tmp_path):
    from jaxinf.data import load_splits
    recs = user_rows(20, ("x", "y"))
    recs += [dict(r) for r in recs]  # every row twice: the held-out part must meet its twins
    path = write_jsonl(tmp_path / "rows.jsonl", recs)
    with pytest.raises(data.DataError, match="have the same prompt and response"):
        load_splits(path, test_fraction=0.5)
    s = load_splits(path, test_fraction=0.5, allow_overlap=True)
    assert s.info["overlap"] == len(data.overlap_pairs(s.train, s.test)) > 0


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(user_rows(1)[0]) + "\n\n" + '{"prompts": "p", "response": }\n')
    with pytest.raises(data.DataError, match=r"rows.jsonl:3: malformed JSON \(.*column.*\); fix line 3") as e:
        load_rows(path, "all")
    assert "\n" not in str(e.value)
    bad = tmp_path / "rows.json"
    bad.write_text('[\n{"prompts": "p",\n "response": "r" "variation": "g"}]')
    with pytest.raises(data.DataError, match=r"rows.json:3: malformed JSON"):
        load_rows(bad, "all")


def test_group_with_one_row_and_test_group_absent_from_training(tmp_path):
    from jaxinf.data import load_splits
    path = write_jsonl(tmp_path / "rows.jsonl", user_rows(8, ("x", "y")) + [
        {"prompts": "lonely?", "response": "yes", "variation": "solo"}])
    with pytest.raises(data.DataError, match=r"rows.jsonl:9: group 'solo' \(--group_column\) has one row.*"
                                             r"add rows of that group"):
        load_splits(path, test_fraction=0.25)
    train = write_jsonl(tmp_path / "train.jsonl", user_rows(8, ("x", "y")))
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompts": "q?", "response": "a", "variation": "x"},
                                                 {"prompts": "q2?", "response": "a", "variation": "unseen"}])
    with pytest.raises(data.DataError, match=r"test.jsonl:2: test group 'unseen' \(--group_column\) has no training "
                                             r"row.*add training rows of that group or drop those test rows"):
        load_splits(train, test_data=test)


def test_empty_response_and_row_longer_than_context(tok):
    rows = [{"prompt": "p", "response": "fine", "group": "a"}, {"prompt": "q", "response": "  ", "group": "a"}]
    where = ["f.jsonl:1", "f.jsonl:2"]
    with pytest.raises(data.DataError, match=r"f.jsonl:2: the response \(--response_column\) is empty.*fill it in"):
        tokenize_rows(tok, rows, max_length=32, template="plain", locations=where)
    long = [{"prompt": "p", "response": "r" * 40, "group": "a"}]
    with pytest.raises(data.DataError, match=r"f.jsonl:1: the row is 43 tokens after --template=plain, longer than "
                                             r"the model's context of 30; pass --max_length=30"):
        tokenize_rows(tok, long, max_length=64, template="plain", context=30, locations=where)
    # within the context, max_length truncates as before (a warning, not an error)
    with pytest.warns(UserWarning, match="truncated"):
        assert tokenize_rows(tok, long, max_length=20, template="plain", context=30).input_ids.shape == (1, 20)
