#!/bin/sh
# `python -m serving` with the CUDA and cuDNN libraries of the pip packages loaded first:
# onnxruntime finds them in site-packages only when asked (preload_dlls), and the serving
# code stays the same on every device.
exec python -c 'import runpy, sys, onnxruntime
onnxruntime.preload_dlls()
sys.argv[0] = "serving"
runpy.run_module("serving", run_name="__main__", alter_sys=True)' "$@"
