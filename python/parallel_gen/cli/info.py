"""``parallel-gen info``: the model's metadata and how llama.cpp was built."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

from .options import ExitStatus


HELP = "show the model's metadata and how llama.cpp was built"
DESCRIPTION = None
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``info``."""
    p.add_argument("-m", "--model", help="GGUF file (default: the packaged default model)")
    p.add_argument("--json", action="store_true", help="print the information as JSON")


def _info_data(model_path: Optional[str]) -> Dict[str, Any]:
    import llama_cpp

    import parallel_gen

    from .._native import _core
    from ..config import cpu_threads
    from ..model import Model
    from ..model_files import default_model_path
    from ..repack import choose_repack, cpu_build

    cpu = cpu_build()
    repack = choose_repack(None, cpu)
    data: Dict[str, Any] = {
        "build": {
            "parallel_gen": parallel_gen.__version__,
            "llama_cpp_python": llama_cpp.__version__,
            "libllama": _core.libllama_path(),
            "backends": list(_core.backends()),
            "gpu_offload": bool(_core.supports_gpu_offload()),
            "system_info": _core.system_info().strip(),
            "threads": cpu_threads(),
            "cpu_features": dict(cpu.features),
            "extra_buffer_types": list(cpu.extra_buffer_types),
            "amx_kernels": cpu.amx_kernels,
            "repack_default": repack.use_extra_bufts,
            "repack_reason": repack.reason,
        }
    }
    try:
        path = model_path or str(default_model_path())
        with Model(path, n_parallel=1, n_ctx=64) as m:
            meta = m.metadata()
            arch = meta.get("general.architecture", "")
            template = m.chat_template()
            data["model"] = {
                "path": str(path),
                "name": meta.get("general.name", ""),
                "description": m.description,
                "architecture": arch,
                "parameters": int(m.handle.n_params),
                "size_bytes": int(m.handle.size_bytes),
                "layers": int(m.handle.n_layer),
                "context_length": int(m.n_ctx_train),
                "vocabulary": int(m.n_vocab),
                "chat_template": template is not None,
                "repack": m.repack,
                **_kv_info(m),
            }
    except (OSError, ValueError) as e:  # missing or unloadable (ModelLoadError is a ValueError)
        data["model"] = {"error": os_error_text(e)}
    return data


def _kv_info(m: Any) -> Dict[str, Any]:
    """KV cache figures: per token, and what a default Model (ModelConfig()) allocates here."""
    from ..config import ModelConfig
    from ..memory import available_memory, capped_default_n_ctx, kv_cell_bytes, kv_cells
    from ..model import DEFAULT_N_CTX

    d = ModelConfig()
    per_token = kv_cell_bytes(m.metadata(), d.type_k, d.type_v)
    n_ctx = capped_default_n_ctx(max(8, min(m.n_ctx_train, DEFAULT_N_CTX)), per_token, d.kv_streams,
                                 available_memory())
    return {"kv_bytes_per_token": per_token, "kv_bytes_allocated": m.kv_bytes, "default_n_ctx": n_ctx,
            "default_kv_bytes": kv_cells(n_ctx, d.kv_streams, d.kv_unified, d.kv_size, d.n_parallel) * per_token}


def run(args: argparse.Namespace) -> int:
    """The ``info`` command."""
    from ..config import ModelConfig

    data = _info_data(args.model)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        b = data["build"]
        print(f"parallel_gen {b['parallel_gen']} on llama-cpp-python {b['llama_cpp_python']}")
        print(f"  libllama:    {b['libllama']}")
        print(f"  backends:    {', '.join(b['backends'])} (GPU offload: {'yes' if b['gpu_offload'] else 'no'})")
        print(f"  system:      {b['system_info']}")
        print(f"  threads:     {b['threads']} (default n_threads)")
        print(f"  repacking:   {'on' if b['repack_default'] else 'off'} by default: {b['repack_reason']}; "
              f"extra buffer types: {', '.join(b['extra_buffer_types']) or 'none'}")
        m = data["model"]
        if "error" in m:
            print(f"model: not available: {m['error']}")
        else:
            print(f"model: {m['path']}")
            print(f"  name:           {m['name']} ({m['description']})")
            print(f"  architecture:   {m['architecture']}")
            print(f"  parameters:     {m['parameters'] / 1e6:.1f} M ({m['size_bytes'] / 2**20:.0f} MiB on disk)")
            print(f"  layers:         {m['layers']}")
            print(f"  context length: {m['context_length']} tokens (training)")
            print(f"  vocabulary:     {m['vocabulary']} tokens")
            print(f"  chat template:  {'yes' if m['chat_template'] else 'no (a base model: use plain prompts)'}")
            print(f"  repacking:      {'on (extra buffer types)' if m['repack'] else 'off'}")
            print(f"  KV cache:       {m['kv_bytes_per_token'] / 1024:.1f} KiB per token (f16); a default Model "
                  f"({ModelConfig().n_parallel} slots of n_ctx {m['default_n_ctx']}) allocates "
                  f"{m['default_kv_bytes'] / 2**20:.0f} MiB")
    if "error" in data["model"]:
        print(f"parallel-gen info: error: {data['model']['error']}", file=sys.stderr)
        return ExitStatus.FAILED
    return ExitStatus.OK


def os_error_text(e: BaseException) -> str:
    """An OSError as "reason: file"; any other error as its message."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e)
