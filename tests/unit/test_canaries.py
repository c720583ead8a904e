"""Canaries (making, planting, storing), whole-record packing (the packer on its own, and `prepare` on the tiny
model with `--canaries` and under privacy.mode local), and the arithmetic of exposure and membership AUC."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_OVERRIDES, TOPICS, site_records, write_jsonl

from fedtune import models
from fedtune.data import prepare_site
from fedtune.data.sources import Record
from fedtune.data.tokenize import IGNORE, Packer, pack, tokenize_records
from fedtune.errors import BadInput
from fedtune.privacy.canaries import (
    CANARIES_FILE,
    Canary,
    SecretFormat,
    make_canaries,
    planting_order,
    read_canaries,
    secret_format_for,
    secret_tokens,
    write_canaries,
)
from fedtune.privacy.exposure import (
    chance_std,
    draw_candidates,
    exposure_of,
    membership_auc,
    score_continuations,
)

SITE = "clinic"


# --- canaries on their own ----------------------------------------------------------------------------

def test_secret_format_renders_every_number_with_its_leading_zeros():
    fmt = SecretFormat()
    assert fmt.space == 10**6
    assert fmt.render(0) == "0 0 0 0 0 0" and fmt.render(904217) == "9 0 4 2 1 7"
    assert fmt.number("0 1 2 3 4 5") == 12345
    assert all(fmt.number(fmt.render(n)) == n for n in (0, 7, 99999, 999999))
    assert SecretFormat(9, "").render(42) == "000000042"


def test_canaries_have_distinct_prompts_and_fresh_secrets():
    first, second = make_canaries(30, repeats=3), make_canaries(30, repeats=3)
    assert len({c.prompt for c in first}) == 30
    assert all(c.repeats == 3 and c.prompt.startswith("What is the access code for account ") for c in first)
    # OS randomness, not a seed: two draws share (almost surely) nothing.
    assert not {c.secret for c in first} & {c.secret for c in second}
    assert not {c.prompt for c in first} & {c.prompt for c in second}


def test_planting_order_keeps_the_records_in_order_and_places_every_copy():
    canaries = [Canary("p1", "1 1 1 1 1 1", 3), Canary("p2", "2 2 2 2 2 2", 2)]
    order, positions, copies = planting_order(20, canaries)
    assert len(order) == 25 and sorted(order.tolist()) == list(range(25))
    own = [int(i) for i in order if i < 20]
    assert own == list(range(20))
    assert positions == sorted(positions) and [int(order[p]) for p in positions] == list(range(20, 25))
    assert sorted(c.prompt for c in copies) == ["p1", "p1", "p1", "p2", "p2"]
    placements = {tuple(planting_order(50, canaries)[1]) for _ in range(5)}
    assert len(placements) > 1  # drawn afresh each time


def test_canaries_file_is_private_and_bound_to_its_folder(tmp_path):
    canaries = make_canaries(2)
    write_canaries(tmp_path / CANARIES_FILE, SITE, canaries, [3, 4], "ab" * 32)
    assert stat.S_IMODE(os.stat(tmp_path / CANARIES_FILE).st_mode) == 0o600
    card = {"site": SITE, "files": {"train.parquet": "ab" * 32}}
    loaded = read_canaries(tmp_path, card)
    assert loaded.canaries == canaries and loaded.rows == [3, 4] and loaded.format == SecretFormat()
    with pytest.raises(BadInput, match="canaries of site 'clinic'.*prepared for site 'bank'"):
        read_canaries(tmp_path, {**card, "site": "bank"})
    with pytest.raises(BadInput, match="another preparation"):
        read_canaries(tmp_path, {**card, "files": {"train.parquet": "cd" * 32}})
    assert read_canaries(tmp_path / "nothing-here", card) is None


def test_secret_tokenizes_to_the_same_length_for_every_candidate(tiny_model):
    """On the test tokenizer every six-digit secret is six tokens written plainly and eleven with spaces (digit,
    space, digit, …), so all candidates of a canary are scored over the same number of tokens; prepare picks the
    plain format, which costs half as much to score."""
    tokenizer = models.load_tokenizer(str(tiny_model))
    assert secret_format_for(tokenizer) == SecretFormat(6, "")
    for fmt, expected in ((SecretFormat(6, ""), 6), (SecretFormat(), 11)):
        canary = make_canaries(1, fmt=fmt)[0]
        numbers = list(range(0, fmt.space, 9973)) + [fmt.space - 1]
        _, tokens = secret_tokens(tokenizer, canary, [canary.secret] + [fmt.render(n) for n in numbers])
        assert {len(t) for t in tokens} == {expected}
        ids, labels = tokenize_records(tokenizer, [Record(messages=canary.messages())])[0]
        assert sum(1 for t in labels if t != IGNORE) == expected + 2  # the secret, then <|im_end|> and newline


# --- whole-record packing ----------------------------------------------------------------------------

def _records(lengths: list[int], eos: int = 1) -> list[tuple[list[int], list[int]]]:
    """Records of the given lengths; token values count up from 10 so every token is unique, the last one EOS."""
    out, value = [], 10
    for length in lengths:
        ids = list(range(value, value + length - 1)) + [eos]
        value += length
        out.append((ids, [IGNORE] + ids[1:]))
    return out


def test_whole_records_never_cross_a_row_and_long_ones_are_cut():
    samples = _records([3, 4, 2, 9, 5, 1, 8])
    ids, labels = pack(samples, seq_len=8, pad_id=0, whole_records=True)
    # [3 4] fit 7 ≤ 8; 2 starts a row; 9 is cut to 8 in its own row; then [5 1] and [8].
    expected_rows = [[0, 1], [2], [3], [4, 5], [6]]
    assert ids.shape == (len(expected_rows), 8)
    for row, members in enumerate(expected_rows):
        content = [t for i in members for t in samples[i][0][:8]]
        assert ids[row, :len(content)].tolist() == content
        assert labels[row, :len(content)].tolist() == [t for i in members for t in samples[i][1][:8]]
        assert (ids[row, len(content):] == 0).all() and (labels[row, len(content):] == IGNORE).all()


def test_whole_records_spans_cut_counts_and_blocks(monkeypatch):
    monkeypatch.setattr(Packer, "BLOCK_ROWS", 2)  # forces several blocks through the writer
    written = []
    packer = Packer(6, 0, lambda ids, labels: written.append(ids.copy()), whole_records=True)
    samples = _records([4, 4, 10, 2, 2, 2, 3])
    flat = [t for s in samples for t in s[0]]
    flat_labels = [t for s in samples for t in s[1]]
    spans = packer.add(flat, flat_labels, [len(s[0]) for s in samples])
    packer.close()
    assert spans.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [3, 3], [3, 3], [4, 4]]
    assert packer.rows == 5 == sum(len(b) for b in written)
    assert packer.cut_records == 1 and packer.cut_tokens == 4 and packer.cut_trained == 4


def test_concatenate_spans_name_every_row_a_record_touches():
    packer = Packer(4, 0)
    spans = packer.add(list(range(1, 11)), list(range(1, 11)), [3, 5, 2])
    assert spans.tolist() == [[0, 0], [0, 1], [2, 2]]
    assert packer.add([7, 7, 7], [7, 7, 7]).tolist() == [[2, 3]]  # one record (no lengths): continues the stream


def test_whole_record_packing_without_cuts_loses_no_token():
    samples = _records([5, 3, 6, 6, 2, 1, 4, 7])
    ids, _ = pack(samples, seq_len=7, pad_id=0, whole_records=True)
    assert sorted(t for t in ids.reshape(-1).tolist() if t) == sorted(t for s in samples for t in s[0])


# --- prepare with canaries and under local DP ------------------------------------------------------------

def _federation(tmp_path, tiny_model, **overrides):
    from fedtune.federation import init_federation

    settings = json.loads(json.dumps(TINY_OVERRIDES)) | overrides
    return init_federation(tmp_path / "fed", list(TOPICS), str(tiny_model), settings)


def _rows(folder, split):
    table = pq.read_table(folder / f"{split}.parquet")
    return table.column("input_ids").to_pylist(), table.column("labels").to_pylist()


def _contains(row: list[int], needle: list[int]) -> bool:
    return any(row[i:i + len(needle)] == needle for i in range(len(row) - len(needle) + 1))


def test_prepare_plants_canaries_in_train_only_and_keeps_them_off_the_card(tmp_path, tiny_model):
    config = _federation(tmp_path, tiny_model, seq_len=64)
    raw = write_jsonl(tmp_path / "clinic.jsonl", site_records("clinic", 60))
    out = tmp_path / "prepared"
    card = prepare_site(config, SITE, [raw], out, canaries=4, canary_repeats=3)

    assert card["canaries"] == {"count": 4, "repeats": 3}
    assert stat.S_IMODE(os.stat(out / CANARIES_FILE).st_mode) == 0o600
    planted = read_canaries(out, card)
    assert len(planted.canaries) == 4 and all(c.repeats == 3 for c in planted.canaries)
    text = (out / "data_card.json").read_text()
    for canary in planted.canaries:
        assert canary.secret not in text and canary.prompt not in text and canary.prompt[-6:-1] not in text
    assert "access code" not in text
    assert card["records"]["train"] + card["records"]["eval"] == card["records"]["kept"]  # site records only

    tokenizer = models.load_tokenizer(str(tiny_model))
    train, _ = _rows(out, "train")
    evaluation, _ = _rows(out, "eval")
    stream, eval_stream = [t for row in train for t in row], [t for row in evaluation for t in row]
    rows = set()
    for canary in planted.canaries:
        ids, labels = tokenize_records(tokenizer, [Record(messages=canary.messages())])[0]
        secret = [t for t, label in zip(ids, labels) if label != IGNORE][:-2]  # the answer, without the end of turn
        assert not _contains(eval_stream, secret)
        # Each copy is a whole record in the token stream, tokenized as the site's records are.
        copies = [i for i in range(len(stream)) if stream[i:i + len(ids)] == ids]
        assert len(copies) == 3
        for i in copies:
            rows.update(range(i // 64, (i + len(ids) - 1) // 64 + 1))
    assert rows == set(planted.rows)
    assert "access code" not in tokenizer.decode(eval_stream)
    assert "access code" not in tokenizer.decode([t for r, row in enumerate(train) if r not in rows for t in row])


def test_prepare_without_canaries_writes_no_canaries_file(tmp_path, tiny_model):
    config = _federation(tmp_path, tiny_model)
    card = prepare_site(config, SITE, [write_jsonl(tmp_path / "c.jsonl", site_records("clinic"))], tmp_path / "p")
    assert card["canaries"] == {"count": 0, "repeats": 0} and not (tmp_path / "p" / CANARIES_FILE).exists()
    assert card["packing_mode"] == "concatenate" and card["packing"].startswith("concatenate records with EOS")
    with pytest.raises(BadInput, match="--canaries"):
        prepare_site(config, SITE, [tmp_path / "c.jsonl"], tmp_path / "q", canaries=2, canary_repeats=0)


def test_overwrite_keeps_the_sites_privacy_ledger(tmp_path, tiny_model):
    config = _federation(tmp_path, tiny_model)
    raw = write_jsonl(tmp_path / "c.jsonl", site_records("clinic"))
    out = tmp_path / "p"
    prepare_site(config, SITE, [raw], out, canaries=1)
    (out / "privacy_ledger.json").write_text('{"spent": [1.5]}\n')
    os.chmod(out / "privacy_ledger.json", 0o600)
    prepare_site(config, SITE, [raw], out, overwrite=True)
    assert json.loads((out / "privacy_ledger.json").read_text()) == {"spent": [1.5]}
    assert stat.S_IMODE(os.stat(out / "privacy_ledger.json").st_mode) == 0o600
    assert not (out / CANARIES_FILE).exists()  # the new preparation has no canaries


def test_local_dp_packs_whole_records(tmp_path, tiny_model):
    """Under privacy.mode local every train and eval row is whole records and padding: re-tokenizing the input
    finds each segment between two record starts (<|im_start|>user) among the records, or cut to seq_len."""
    config = _federation(tmp_path, tiny_model, seq_len=150,
                         privacy={"mode": "local", "local": {"noise_multiplier": 1.0}})
    records = site_records("clinic", 60) + [{"instruction": "Summarise the coding rules for " + " ".join(
        f"alpha-{i} beta-{i}" for i in range(24)), "output": "Use the chapter codes as listed above."}]
    raw = write_jsonl(tmp_path / "c.jsonl", records)
    card = prepare_site(config, SITE, [raw], tmp_path / "p", canaries=2, canary_repeats=2)
    assert card["packing_mode"] == "whole-records"
    assert "a record that does not fit starts the next sequence" in card["packing"]

    tokenizer = models.load_tokenizer(str(tiny_model))
    planted = read_canaries(tmp_path / "p", card)
    known = [Record(messages=[{"role": "user", "content": r["instruction"]},
                              {"role": "assistant", "content": r["output"]}]) for r in records]
    known += [Record(messages=c.messages()) for c in planted.canaries]
    tokenized = [tuple(ids) for ids, _ in tokenize_records(tokenizer, known)]
    whole, cut = set(tokenized), {t[:config.seq_len] for t in tokenized if len(t) > config.seq_len}
    assert cut and card["records_cut_to_seq_len"]["train"] + card["records_cut_to_seq_len"]["eval"] == 1
    opening = list(tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"])  # how every record starts
    assert all(list(t[:len(opening)]) == opening for t in tokenized)
    pad = tokenizer.pad_token_id
    for split in ("train", "eval"):
        for ids, labels in zip(*_rows(tmp_path / "p", split)):
            used = len(ids)
            while used and ids[used - 1] == pad and labels[used - 1] == IGNORE:
                used -= 1
            starts = [i for i in range(used) if ids[i:i + len(opening)] == opening] + [used]
            assert starts[0] == 0
            for a, b in zip(starts, starts[1:]):
                segment = tuple(ids[a:b])
                assert segment in whole or segment in cut, (split, tokenizer.decode(segment))


# --- exposure and membership arithmetic ----------------------------------------------------------------

def test_exposure_counts_ties_half_and_tops_out_at_log2_r_plus_1():
    scores = np.array([-5.0, -3.0, -3.0, -1.0])
    assert exposure_of(0.0, scores) == (pytest.approx(math.log2(5)), 1.0)
    exposure, rank = exposure_of(-3.0, scores)
    assert rank == 1 + 1 + 0.5 * 2 and exposure == pytest.approx(math.log2(5) - math.log2(3))
    assert exposure_of(-9.0, scores)[1] == 5 and exposure_of(-9.0, scores)[0] == pytest.approx(0.0)


def test_membership_auc_is_the_pairwise_probability():
    rng = np.random.default_rng(0)
    members, others = rng.normal(-0.3, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounding makes ties
    pairs = [(m < o) + 0.5 * (m == o) for m in members for o in others]
    assert membership_auc(members, others) == pytest.approx(np.mean(pairs))
    assert membership_auc(np.zeros(5), np.zeros(7)) == 0.5
    assert membership_auc([1.0, 2.0], [3.0, 4.0]) == 1.0 and membership_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert chance_std(100, 100) == pytest.approx(math.sqrt(201 / 120000))


def test_candidates_are_distinct_of_the_format_and_never_the_secret():
    fmt = SecretFormat(3, "")
    drawn = draw_candidates(fmt, "042", 999)  # every other secret of the format
    assert len(set(drawn)) == 999 and "042" not in drawn and all(len(d) == 3 and d.isdigit() for d in drawn)
    with pytest.raises(BadInput, match="--candidates 1000"):
        draw_candidates(fmt, "042", 1000)


def test_cached_scores_equal_a_full_forward_pass(tiny_model):
    """Scoring candidates after the prompt's cached keys and values gives the same log-likelihood as running
    prompt and secret together, whatever the batch size."""
    import torch

    tokenizer, model = models.load_tokenizer(str(tiny_model)), models.load_base_model(str(tiny_model))
    fmt = secret_format_for(tokenizer)
    canary = make_canaries(1, fmt=fmt)[0]
    candidates = [canary.secret] + draw_candidates(fmt, canary.secret, 20)
    prompt, tokens = secret_tokens(tokenizer, canary, candidates)
    assert len({len(t) for t in tokens}) == 1 and prompt
    ids, labels = tokenize_records(tokenizer, [Record(messages=canary.messages())])[0]
    assert ids[:len(prompt)] == prompt and ids[len(prompt):len(prompt) + len(tokens[0])] == tokens[0]
    assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] == tokens[0][0]  # trained from the answer on
    cached = score_continuations(model, prompt, tokens, batch_size=8)
    assert np.allclose(cached, score_continuations(model, prompt, tokens), atol=1e-4)
    with torch.no_grad():
        for i in (0, 7, 20):
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + tokens[i]])).logits[0].float(), -1)
            full = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens[i]))
            assert cached[i] == pytest.approx(full, abs=1e-3)


def test_canaries_survive_worker_processes(tmp_path, tiny_model, monkeypatch):
    """Tokenized by two worker processes, the planted split still holds every copy once, in the rows recorded."""
    import fedtune.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "MIN_RECORDS_PER_PROCESS", 10)
    config = _federation(tmp_path, tiny_model)
    out = tmp_path / "p"
    card = prepare_site(config, SITE, [write_jsonl(tmp_path / "c.jsonl", site_records("clinic", 60))], out,
                        num_proc=2, canaries=2, canary_repeats=2)
    planted = read_canaries(out, card)
    tokenizer = models.load_tokenizer(str(tiny_model))
    train, _ = _rows(out, "train")
    stream = [t for row in train for t in row]
    seq_len = config.seq_len
    for canary in planted.canaries:
        ids, _ = tokenize_records(tokenizer, [Record(messages=canary.messages())])[0]
        copies = [i for i in range(len(stream)) if stream[i:i + len(ids)] == ids]
        assert len(copies) == 2
        assert all(set(range(i // seq_len, (i + len(ids) - 1) // seq_len + 1)) <= set(planted.rows) for i in copies)
