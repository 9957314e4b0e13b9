"""Worker of tests/test_prompt_store.py: 20,000 distinct prompts into a PromptStore by 2 gloo processes.

Each process records the host memory it added while the store was built and read (peak of its anonymous resident
memory, ``rss - shared``, sampled every 2 ms: the memory-mapped shards are file cache, shared by the processes), how
many prompts it encoded, and the same for a second build over the same folder (what a resumed run does).

usage: prompt_store_worker.py FOLDER OUT_JSON_PREFIX
"""

import json
import sys
import threading
import time

import psutil
import torch

NUM_PROMPTS, HIDDEN, TOKENS = 20_000, 128, 12


def main():
    from accelerate import Accelerator
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from tiny_teachers import tiny_clip_tokenizer

    from fd_onestep.pipelines.pipeline_fd_onestep import OneStepConditioning
    from fd_onestep.prompt_store import PromptStore

    folder, out = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    vocab = tok.get_vocab()
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=TOKENS,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    # distinct prompts "p<i in base 26 letters>"
    prompts = ["".join(chr(97 + (i // 26 ** k) % 26) for k in range(4)) for i in range(NUM_PROMPTS)]
    encoded = []

    def encode(chunk):
        # one id per letter (the tokenizer's single-letter pieces), padded: the slow BPE tokenizer would dominate
        encoded.append(len(chunk))
        ids = torch.full((len(chunk), TOKENS), vocab["<|endoftext|>"], dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, :len(prompt)] = torch.tensor([vocab[c] for c in prompt[:TOKENS]])
        return OneStepConditioning(prompt_embeds=encoder(ids).last_hidden_state)

    proc = psutil.Process()
    anon = lambda: proc.memory_info().rss - proc.memory_info().shared  # noqa: E731
    peak, done = [], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(max(peak[-1], anon()))
            time.sleep(0.002)

    with torch.no_grad():  # warm up: the first forward's one-off allocations (kernels, allocator pools) are not the store's
        encode(prompts[:256])
    encoded.clear()
    base = anon()
    peak.append(base)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    store = PromptStore.build(folder, prompts, encode, encoders_digest="tiny-clip", accelerator=accelerator,
                              chunk_size=128, shard_size=512)
    rows = store[torch.randint(len(store), (64,), generator=torch.Generator().manual_seed(accelerator.process_index))]
    first = sum(encoded)
    encoded.clear()
    again = PromptStore.build(folder, prompts, encode, encoders_digest="tiny-clip", accelerator=accelerator)
    done.set()
    thread.join()
    result = {"encoded": first, "encoded_again": sum(encoded), "peak_added_bytes": max(peak) - base,
              "store_bytes": store.nbytes, "rows": list(rows.prompt_embeds.shape), "num_prompts": len(again),
              "row_0_equal": bool(torch.equal(again[[0]].prompt_embeds, encode(prompts[:1]).prompt_embeds))}
    with open(f"{out}-{accelerator.process_index}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
