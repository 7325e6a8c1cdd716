"""The Triton watermark kernel without a GPU: run under the interpreter (bit-exact against the torch
reference) and compiled for sm_90 with the ptxas that ships in the Triton wheel (the GPU code path
uses IEEE division and unsigned integer ops, which the exactness claim depends on)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_watermark_interpret_worker.py")

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@needs_triton
def test_interpreted_kernel_is_bit_exact_against_reference() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(WORKER)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == 16
    bad = [c for c in cases if c["mismatches"]]
    assert not bad, json.dumps(bad, indent=1)
    assert sum(c["touched"] for c in cases) > 0  # the watermark did something
    assert sum(c["gated_rows_touched"] for c in cases) > 0  # and some confidence-gated row was open


def _compile(kernel, signature: dict, constexprs: dict, num_warps: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    except TypeError:  # the offline-compile API moved between Triton releases (written for 3.9)
        pytest.skip(f"offline compile API differs in Triton {triton.__version__}")
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernel_compiles_for_hopper_with_exact_arithmetic(dtype: str) -> None:
    try:
        from triton import knobs

        ptxas = Path(knobs.nvidia.ptxas.path)
    except (ImportError, AttributeError):
        pytest.skip("this Triton release has no knobs.nvidia.ptxas")
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    from kernels import watermark_triton as W

    pointers = {"logits_ptr": f"*{dtype}", "stride_row": "i32", "table_ptr": "*i32", "cand_ptr": "*i32"}
    gate = {"open_ptr": "*i32", "floor_ptr": "*fp32"}
    constexprs = {"BLOCK": 4096, "LOGITS_BF16": dtype == "bf16", "HAS_GATED": True}
    main_sig = pointers | gate | {"vocab": "i32", "n_blocks": "i32"} | dict.fromkeys(constexprs, "constexpr")
    ptx = _compile(W._watermark_kernel, main_sig, constexprs, 8)
    ops = set(re.findall(r"^\s*([a-z]+(?:\.[\w]+)+)", ptx, re.M))
    assert "div.rn.f32" in ops  # 1 / T correctly rounded, like torch (Triton's `/` is div.full)
    assert not any(op.startswith(("div.full", "div.approx")) for op in ops)
    assert "min.u32" in ops and "setp.lt.u32" in ops  # unsigned min and threshold compare
    assert "setp.ge.f32" in ops or "setp.geu.f32" in ops  # the gated rows' near-tie window
    fin_sig = pointers | {"n_blocks": "i32", "NB": "constexpr"}
    assert _compile(W._gumbel_finalize_kernel, fin_sig, {"NB": 32}, 1)
