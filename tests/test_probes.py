"""The benchmarks' sitecustomize probes patch their module right after it loads, through
benchmarks/probe_hooks.py, and leave the training process's sys.path as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# code that loads the host probe as ``s``: by path, because the interpreter may
# have a sitecustomize of its own
LOAD_HOST_PROBE = (
    "import importlib.util as u\n"
    f"spec = u.spec_from_file_location('probe', {str(BENCH / 'host_probe' / 'sitecustomize.py')!r})\n"
    "s = u.module_from_spec(spec); spec.loader.exec_module(s)\n"
)


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_patch_runs_after_the_module_and_the_hook_steps_aside() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
        "from probe_hooks import PatchOnImport, patch_on_import\n"
        "seen = []\n"
        "patch_on_import({'colorsys': lambda m: seen.append(hasattr(m, 'rgb_to_hsv'))})\n"
        "import colorsys\n"
        "print(seen, any(isinstance(f, PatchOnImport) for f in sys.meta_path))"
    )
    assert _python(code, {}) == "[True] False"


@pytest.mark.parametrize(
    ("probe", "env"),
    [
        ("host_probe", "ZEROPLAN_HOST_PROBE"),
        ("nan_probe", "ZP_NAN_PROBE"),
        ("recipe_probe", "RECIPE_PROBE_OUT"),
    ],
)
def test_each_probe_patches_the_trainer_on_import(probe: str, env: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    code = (
        "import sys, transformers.trainer as t\n"
        f"print(t.Trainer.__init__.__module__ == 'sitecustomize', {str(BENCH)!r} in sys.path)"
    )
    on = {"PYTHONPATH": f"{BENCH / probe}{os.pathsep}{ROOT}", env: str(tmp_path / "p.json")}
    assert _python(code, on) == "True False"


def test_the_host_probe_sorts_kernels_by_what_they_do() -> None:
    """ATen's kernel names end in _kernel like Triton's, and flash attention's name CUTLASS
    types: each goes to its own kind (an earlier table put every ATen elementwise kernel
    under Triton and flash's backward under matmul)."""
    names = {
        "nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_NNT": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<cutlass::bfloat16_t>": (
            "attention"
        ),
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*)": "dequant",
        "Memcpy DtoH (Device -> Pageable)": "copy",
        "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::"
        "BFloat16>>": "elementwise",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "copy",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "reduce",
        "_rms_norm_backward_kernel": "triton",
        "triton_poi_fused_add_mul_0": "triton",
        "Optimizer.step#AdamW.step": "other",
    }
    code = LOAD_HOST_PROBE + (f"print([s._kind(n) for n in {list(names)!r}])")
    assert _python(code, {}) == repr(list(names.values()))


def test_the_host_probe_names_the_python_line_behind_a_copy() -> None:
    """caller_chain: the operators above an event and, from a with_stack profile, the
    innermost frame outside torch that called them (CPU: a clone's copy)."""
    code = LOAD_HOST_PROBE + (
        "import torch\n"
        "def make_copy():\n"
        "    return torch.ones(8).clone()\n"
        "with torch.profiler.profile(with_stack=True) as prof:\n"
        "    make_copy()\n"
        "(e,) = [e for e in prof.events() if e.name == 'aten::copy_'\n"
        "        and e.cpu_parent is not None and e.cpu_parent.name == 'aten::clone']\n"
        "print(s.caller_chain(e))\n"
    )
    chain = _python(code, {})
    assert chain.startswith("aten::clone") and "make_copy" in chain, chain
    assert "[" not in chain  # no GPU memcpy on the CPU


def test_the_host_probe_names_each_read_of_a_tensor_value_backward_included() -> None:
    """HostReads: an ``.item()`` in a forward and one in a custom backward (which the
    autograd engine runs) are each counted once, under the Python line that made them."""
    pytest.importorskip("torch")
    code = LOAD_HOST_PROBE + (
        "import torch\n"
        "class Reads(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        return x * 2\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        scale = g.sum().item()  # read_in_backward\n"
        "        return g * 2 + 0 * scale\n"
        "def step(x):\n"
        "    y = Reads.apply(x).sum()\n"
        "    loss = y.item()  # read_in_forward\n"
        "    y.backward()\n"
        "    return loss\n"
        "x = torch.ones(4, requires_grad=True)\n"
        "mode = s.host_reads_mode()\n"
        "with mode:\n"
        "    step(x)\n"
        "    torch.ones(3).clone()  # no read\n"
        "for k, v in sorted(mode.seen.items()):\n"
        "    print(v, k)\n"
    )
    lines = _python(code, {}).splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("1 _local_scalar_dense @ <string>:") for line in lines), lines
    assert any(" backward < " in line for line in lines), lines
    assert any(" step < " in line for line in lines), lines


def test_the_host_probe_closes_its_windows_before_the_final_save() -> None:
    """The last step's end closes the host-read mode and the profiler: the final save comes
    next in the Trainer's loop, and its copies to the host (896 a step in host6's profile,
    the reads of host7) are not a step's. An earlier step's end leaves them open."""
    pytest.importorskip("transformers")
    code = LOAD_HOST_PROBE + (
        "from types import SimpleNamespace as NS\n"
        "class Trainer:\n"
        "    def __init__(self):\n"
        "        self.accelerator = NS(backward=lambda *a, **k: None)\n"
        "        self.callbacks = []\n"
        "    def add_callback(self, cb):\n"
        "        self.callbacks.append(cb)\n"
        "s._patch(NS(Trainer=Trainer))\n"
        "cb = Trainer().callbacks[0]\n"
        "s.PROBE.reads = s.host_reads_mode()\n"
        "s.PROBE.reads.__enter__()\n"
        "cb.on_step_end(None, NS(global_step=4, max_steps=5), None)\n"
        "print(s.PROBE.reads is None)\n"
        "cb.on_step_end(None, NS(global_step=5, max_steps=5), None)\n"
        "print(s.PROBE.reads is None)\n"
    )
    assert _python(code, {}).splitlines() == ["False", "True"]


def test_the_host_probe_keeps_site_packages_frames_under_a_torch_named_folder() -> None:
    """Only torch's own files are left out of a read's lines: the GPU image's environment
    lives in /opt/torch/.venv, and a "/torch/" anywhere in a path hid transformers' frames."""
    code = LOAD_HOST_PROBE + (
        "print(s._outside_torch('/opt/torch/.venv/lib/python3.12/site-packages/transformers/"
        "trainer.py(2175): _maybe_log_save_evaluate'))\n"
        "print(s._outside_torch(s.TORCH_DIR + 'nn/modules/module.py(1775): _call_impl'))\n"
    )
    assert _python(code, {}).splitlines() == ["True", "False"]


def test_the_host_probe_names_what_launched_the_copy_kernels() -> None:
    """copy_kernel_callers: the GPU's copy kernels by the operator that launched them and the
    operators above it, calls and milliseconds a step, costliest first; other kernels left
    out. The profiler ties kernels to operators only on a GPU: here its events are stand-ins
    with the fields it fills (name, cpu_parent, kernels of name and duration in µs)."""
    code = LOAD_HOST_PROBE + (
        "from types import SimpleNamespace as E\n"
        "def op(name, parent=None, kernels=()):\n"
        "    return E(name=name, cpu_parent=parent, stack=[],\n"
        "             kernels=[E(name=n, duration=d) for n, d in kernels])\n"
        "clone = op('aten::clone', op('LoRAGroupBackward'))\n"
        "copy = 'void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>'\n"
        "events = [op('aten::copy_', clone, [(copy, 30.0)]) for _ in range(4)]\n"
        "events += [op('aten::cat', op('LoRAGroup'), [('void at::native::CatArrayBatchedCopy<bf16>', 5.0)])]\n"
        "events += [op('aten::mm', None, [('nvjet_sm90_tst_256x128', 900.0)])]\n"
        "import json; print(json.dumps(s.copy_kernel_callers(events, steps=2)))\n"
    )
    out = json.loads(_python(code, {}))
    assert [r["caller"] for r in out] == [
        "aten::copy_ < aten::clone < LoRAGroupBackward",
        "aten::cat < LoRAGroup",
    ]
    assert (out[0]["calls_per_step"], out[0]["ms_per_step"]) == (2.0, 0.06)
