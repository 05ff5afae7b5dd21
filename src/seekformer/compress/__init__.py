"""Smaller, faster models: weight-only quantization, expert pruning, distillation, GGUF export.

quantize.py (int8 / int4 model directories), prune.py (drop routed experts by routing saliency),
distill.py (a knowledge-distillation loss in the shared trainer), gguf.py (llama.cpp's deepseek2 GGUF).
"""
