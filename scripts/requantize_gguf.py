"""Write a copy of a GGUF file with its weight matrices in another format (Q8_0, F16 or F32).

    python scripts/requantize_gguf.py smollm2-135m /tmp/smollm2-q8_0.gguf --type Q8_0

The registry's models all ship as 4-6-bit GGUFs; a Q8_0 or F16 copy is what `--draft quantized`
on `--dtype native` builds its cheaper Q4_K/Q4_0 draft from (selfspec/models/native_draft.py), so this
is how to measure that draft on a real model. Metadata (tokenizer, chat template, config) is
copied as it is; every matrix is dequantised by the `gguf` package and quantised again (norms and
other 1-D tensors keep their format). The copy is the same model rounded differently: its greedy
output may differ from the original's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

# llama.cpp's general.file_type values for the formats written here
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}


def main(argv=None) -> int:
    import gguf

    from selfspec.models.native_draft import quantise_q8_0
    from selfspec.progress import Bar

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a .gguf file or a registry alias")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--type", default="Q8_0", choices=sorted(FILE_TYPES))
    args = ap.parse_args(argv)
    from selfspec.models.registry import REGISTRY

    src = REGISTRY[args.src].path() if args.src in REGISTRY else Path(args.src)
    if args.dst.exists():
        sys.exit(f"{args.dst} exists; remove it or choose another name")
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(args.dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value = FILE_TYPES[args.type] if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)
    target = gguf.GGMLQuantizationType[args.type]
    out = []
    with Bar(f"re-quantising {src.name} to {args.type} (tensors)", len(reader.tensors)) as bar:
        for t in reader.tensors:
            shape = [int(d) for d in t.shape.tolist()]  # GGUF order: [K, rows]
            if len(shape) < 2 or shape[0] % 32:
                out.append((t.name, np.asarray(t.data), t.tensor_type))
            else:
                w = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
                w = w.reshape(-1, shape[0])
                if args.type == "Q8_0":
                    data = quantise_q8_0(torch.from_numpy(w)).numpy()
                else:
                    data = w.astype(np.float16 if args.type == "F16" else np.float32)
                out.append((t.name, data, target))
            bar.advance()
    for name, data, kind in out:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in out:
        writer.write_tensor_data(data)
    writer.close()
    print(f"{args.dst}: {args.dst.stat().st_size / 2**20:.0f} MiB ({args.type} matrices)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
