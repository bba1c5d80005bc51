"""scripts/kv_capacity.py: the layout table against byte counts written out here by hand (full and int8
from their layouts in kv_cache/stores.py, not from the script's own code path), its two files against each other,
--check against real paged generation (and a wrong prediction caught), and bad input as one line, exit 2."""
import json
import math
import subprocess

import pytest

from memory import format_bytes
from scripts import kv_capacity as cs
from scripts.common import REPO_DIR
from shapes import SHAPES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS, NEW, BUDGET_GB = [100, 37, 250, 180], 20, 0.001
ARGV = ["--shape", "tiny", "--prompt_tokens", ",".join(map(str, PROMPTS)), "--new_tokens", str(NEW),
        "--kv_memory_gb", str(BUDGET_GB)]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    cs.main(ARGV + ["--out", str(out)])  # returns (no SystemExit) when it succeeds
    md = (out / "kv_capacity_tiny.md").read_text()
    data = json.loads((out / "kv_capacity_tiny.json").read_text())
    return md, data, {r["key"]: r for r in data["rows"]}


def largest(fits):
    n = 0
    while fits(n + 1):
        n += 1
    return n


def cycled(values, n):
    return sum(values[i % len(values)] for i in range(n))


# The tiny shape: 2 layers, 1 KV head, head_dim 64; bfloat16 (2 bytes).
L_, H, D, ITEM = 2, 1, 64, 2
BUDGET = int(BUDGET_GB * 2**30)
LENGTHS = [p + NEW for p in PROMPTS]
MAX_LEN, MEAN_LEN = max(LENGTHS), round(sum(LENGTHS) / len(LENGTHS))
FULL_TOKEN = 2 * L_ * H * D * ITEM  # keys + values, every layer
# int8: per token and head, an int8 payload of head_dim bytes and one float16 scale, for K and for V.
INT8_TOKEN = 2 * L_ * H * (D * 1 + 2)
SINK, WINDOW = 16, 32


def test_tiny_shape_is_what_the_references_assume():
    a = SHAPES["tiny"]
    assert (a.n_layer, a.n_kv_head, a.head_dim) == (L_, H, D)


def test_contiguous_full_matches_a_hand_count(table):
    _, _, rows = table
    r = rows["contiguous-full"]
    slot = FULL_TOKEN * MAX_LEN  # every sequence preallocated at the longest prompt + new tokens
    fit = BUDGET // slot
    assert r["bytes_per_token"] == FULL_TOKEN
    assert r["bytes_per_sequence"] == slot
    assert r["sequences_fit"] == fit
    assert r["allocated_bytes"] == fit * slot
    assert r["wasted_bytes"] == cycled([(MAX_LEN - n) * FULL_TOKEN for n in LENGTHS], fit)
    assert r["fit_vs_contiguous"] == 1 and r["bytes_per_sequence_vs_contiguous"] == 1


def test_paged_full_matches_a_hand_count(table):
    _, _, rows = table
    r = rows["paged-full"]
    block = 16 * FULL_TOKEN
    blocks = [math.ceil(n / 16) for n in LENGTHS]

    def pool(n):  # the sequences' blocks and the null block
        return max(2, 1 + cycled(blocks, n)) * block

    fit = largest(lambda n: pool(n) <= BUDGET)
    assert r["block_tokens"] == 16 and r["bytes_per_token"] == FULL_TOKEN and r["fixed_bytes_per_sequence"] == 0
    assert r["bytes_per_sequence"] == math.ceil(MEAN_LEN / 16) * block
    assert r["sequences_fit"] == fit
    assert r["allocated_bytes"] == pool(fit)
    assert r["wasted_bytes"] == cycled([(b * 16 - n) * FULL_TOKEN for b, n in zip(blocks, LENGTHS)], fit) + block


def test_paged_int8_matches_a_hand_count(table):
    _, _, rows = table
    r = rows["paged-int8"]
    block = 16 * INT8_TOKEN  # one token per flush group: blocks stay 16 tokens
    # Per sequence, outside the pool: the 16-bit ring of sinks + window + one flushing token, and its slot
    # positions (int64, one per slot and layer).
    ring_slots = SINK + WINDOW + 1
    fixed = ring_slots * FULL_TOKEN + ring_slots * 8 * L_
    capacity = math.ceil((MAX_LEN - SINK - WINDOW) / 16) * 16  # quantized tokens, whole blocks

    def in_store(n):
        return min(max(0, n - SINK - WINDOW), capacity)

    blocks = [math.ceil(in_store(n) / 16) for n in LENGTHS]

    def allocated(n):
        return n * fixed + max(2, 1 + cycled(blocks, n)) * block

    fit = largest(lambda n: allocated(n) <= BUDGET)
    assert r["block_tokens"] == 16 and r["bytes_per_token"] == INT8_TOKEN
    assert r["fixed_bytes_per_sequence"] == fixed
    assert r["bytes_per_sequence"] == fixed + math.ceil(in_store(MEAN_LEN) / 16) * block
    assert r["sequences_fit"] == fit
    assert r["allocated_bytes"] == allocated(fit)
    spare = max(2, 1 + cycled(blocks, fit)) - cycled(blocks, fit)
    unfilled = [b * 16 - in_store(n) for b, n in zip(blocks, LENGTHS)]
    assert r["wasted_bytes"] == cycled(unfilled, fit) * INT8_TOKEN + spare * block


def test_paging_and_int4_fit_more_than_contiguous(table):
    _, _, rows = table
    contiguous = rows["contiguous-full"]["sequences_fit"]
    assert contiguous > 0
    for key in ("paged-full", "paged-int8", "paged-int4", "paged-int2", "paged-fp8"):
        assert rows[key]["sequences_fit"] > contiguous, key
        assert rows[key]["fit_vs_contiguous"] == rows[key]["sequences_fit"] / contiguous
    assert rows["paged-int4"]["sequences_fit"] > rows["paged-full"]["sequences_fit"]
    assert rows["paged-int4"]["block_tokens"] == 32  # 16 rounded up to the key group of 32
    for key in ("contiguous-compress_kv", "paged-compress_kv"):
        assert rows[key]["constant"] and rows[key]["bytes_per_token"] is None


def test_markdown_and_json_agree(table):
    md, data, rows = table
    assert [r["key"] for r in data["rows"]] == cs.LAYOUT_KEYS
    assert data["workload"]["prompt_lengths"] == PROMPTS and data["kv_memory_bytes"] == BUDGET
    md_rows = {cells[0]: cells for cells in
               ([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
                if line.startswith("| ") and not line.startswith("| layout"))}
    assert len(md_rows) == len(rows)
    for r in rows.values():
        cells = md_rows[r["layout"]]
        assert cells[2] == ("constant" if r["constant"] else format_bytes(r["bytes_per_token"]))
        assert cells[4] == format_bytes(r["bytes_per_sequence"])
        assert int(cells[5]) == r["sequences_fit"]
        assert cells[6].startswith(format_bytes(r["wasted_bytes"]))
        assert cells[8] == f"{r['bytes_per_sequence_vs_contiguous']:.3f}x"


def test_checkpoint_config_gives_the_same_table(tmp_path, table):
    _, data, _ = table
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model_args.json").write_text(json.dumps(SHAPES["tiny"].to_dict()))  # no weights: config only
    cs.main([a for a in ARGV if a not in ("--shape", "tiny")] + ["--checkpoint_path", str(ckpt), "--out",
                                                                  str(tmp_path)])
    got = json.loads((tmp_path / "kv_capacity_ckpt.json").read_text())
    assert got["rows"] == data["rows"]


def test_check_passes(capsys):
    with pytest.raises(SystemExit) as e:
        cs.main(["--check"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    verdicts = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(verdicts) == len(cs.LAYOUT_KEYS) and all(v.startswith("ok  ") for v in verdicts), out


def test_check_lines_name_the_pool_of_each_byte_count(capsys):
    """Issue 22 item 16: a paged check builds two pools, one for the check's prompts and one of the budget's size;
    each byte count says which it is (a count over the budget read as if the budget were exceeded)."""
    with pytest.raises(SystemExit) as e:
        cs.main(["--check", "--layouts", "paged-full"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    [line] = [line for line in out.splitlines() if line.startswith("ok  paged full")]
    assert f"bytes allocated with the {len(cs.CHECK_PROMPTS)} prompts' pool of " in line
    assert "allocated with the budget's pool <= budget " in line and "; allocated <= budget" not in line


def test_results_go_to_an_untracked_folder_by_default():
    """Issue 22 item 11: by default nothing is written into the tracked outputs/results/."""
    out = cs.build_parser().parse_args([]).out
    assert out == REPO_DIR / "outputs" / "local"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "kv_capacity_tiny.md")], cwd=REPO_DIR)
    assert ignored.returncode == 0  # .gitignore holds it


def test_a_wrong_prediction_is_caught(capsys, monkeypatch):
    ok, line = cs.compare("paged full", {"blocks per sequence": [3, 4], "bytes allocated": 100},
                          {"blocks per sequence": [3, 5], "bytes allocated": 100})
    assert not ok and line.startswith("FAIL  paged full:") and "[3, 4] predicted but [3, 5] measured" in line
    assert cs.compare("x", {"a": 1}, {"a": 1})[0]
    # An off-by-one in the blocks a sequence holds, through the whole check: a FAIL line and exit 1.
    blocks = cs.Sizer.blocks
    monkeypatch.setattr(cs.Sizer, "blocks", lambda self, length: blocks(self, length) + 1)
    with pytest.raises(SystemExit) as e:
        cs.main(["--check", "--layouts", "paged-full"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "FAIL  paged full: blocks per sequence" in out, out


@pytest.mark.parametrize("bad, says", [
    (["--kv_memory_gb", "-1"], "--kv_memory_gb: must be > 0"),
    (["--shape", "llama-9000"], "unknown shape 'llama-9000'"),
    (["--prompt_tokens", "900-100"], "LOW-HIGH"),
    (["--group_size", "48"], "--group_size 48 must divide head_dim 64"),
    (["--shape", "tiny", "--checkpoint_path", "x"], "give one of them"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bad, says):
    out = tmp_path / "results"
    shape = [] if "--shape" in bad else ["--shape", "tiny"]
    with pytest.raises(SystemExit) as e:
        cs.main(shape + ["--prompt_tokens", "100,200"] + bad + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and says in err, err
    assert "Traceback" not in err and not out.exists()
