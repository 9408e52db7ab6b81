"""``clipforge bench``: clipforge side by side with open_clip and transformers, in one run, same configs and weights.

- ``corpora``: the captions timed (human captions where the data is given, generated ones otherwise);
- ``peers``: the same architecture and weights in open_clip or transformers;
- ``timing``: interleaved timing with rotating order, medians of adjacent-run ratios, peak memory, matmul peak;
- ``tasks``: one measurement each (embedding, training speed, training memory, tokenizer, loss memory);
- ``worker``: the subprocess protocol (a measurement that needs a clean memory peak runs in a fresh process);
- ``cli``: the command: which measurements, and the report.
"""
