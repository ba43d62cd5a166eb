"""`os_memory`: freed heap and read checkpoint pages go back to the OS (attach does both)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

SCRIPT = """
import torch
from torus_plugins.os_memory import release_free_heap

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

# 2,000 blocks of 64 KiB (below glibc's mmap threshold: they live in the heap), all touched; the
# last one stays alive so the freed ones sit below the heap's top, where free() never trims.
blocks = [torch.ones(65536, dtype=torch.uint8) for _ in range(2000)]
keep = blocks[-1]
del blocks
before = anon_kib()
released = release_free_heap()
print(released, before - anon_kib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_heap_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    released, freed_kib = out.stdout.split()
    assert released == "True"
    assert int(freed_kib) > 64 * 1024  # most of the 125 MiB freed


PAGES = """
import torch
from torus_plugins.os_memory import release_pages

def file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])

t = torch.from_file({path!r}, shared=False, size=64 << 20, dtype=torch.uint8)
before = float(t.float().sum())  # every page read
touched = file_kib()
ok = release_pages(t)
print(ok, touched - file_kib(), float(t.float().sum()) == before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")
def test_read_file_pages_leave_the_resident_set_and_keep_their_values(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * (64 << 12))  # 64 MiB
    code = PAGES.format(path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    ok, dropped_kib, same = out.stdout.split()
    assert ok == "True" and same == "True"
    assert int(dropped_kib) > 48 * 1024  # most of the 64 MiB left the resident set


ATTACH = """
import torch, transformers as T
import torus_plugins as tp

def file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])

model = T.AutoModelForCausalLM.from_pretrained({path!r})  # safetensors, mapped: pages read on use
ffn_kib = sum(p.numel() * 4 for n, p in model.named_parameters() if ".mlp." in n) // 1024
base = file_kib()
tp.attach(model, transport="copy", resident_layers=0, weight_quant="int8", store_cache={cache!r})
print(ffn_kib, file_kib() - base)
"""


def test_attach_does_not_keep_the_checkpoints_ffn_pages(tmp_path):
    """Packing reads every FFN weight of a mapped checkpoint once; those pages must not stay in
    the process (a 3B model's would be 4 GiB): what attach adds to the file-backed set is small."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8
    )
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    def attach(cache) -> tuple[int, int]:
        code = ATTACH.format(path=str(tmp_path / "model"), cache=cache)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        ffn_kib, added_kib = map(int, out.stdout.split())
        return ffn_kib, added_kib

    ffn_kib, added_kib = attach(None)
    assert ffn_kib > 70 * 1024
    assert added_kib < ffn_kib // 5, (ffn_kib, added_kib)
    stores = str(tmp_path / "stores")
    attach(stores)  # writes the int8 store (a quarter of the fp32 FFN bytes)
    _, mapped_kib = attach(stores)  # hashes every FFN weight for the key, then maps the store
    assert mapped_kib < ffn_kib // 4 + ffn_kib // 5, (ffn_kib, mapped_kib)
