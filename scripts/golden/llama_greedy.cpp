// Greedy continuations with top-10 probabilities from llama.cpp's library, for the synthetic
// goldens (scripts/golden/synthetic.py builds and runs this; it is modu's own code against
// llama.h, not part of llama.cpp).
//
//   llama_greedy MODEL N_PREDICT N_THREADS < prompts
//
// Each input line holds one prompt's token ids (space-separated). For each prompt, in a fresh
// KV cache: the prompt is decoded in one batch, then N_PREDICT greedy steps follow, one token
// each. Output per step, one line: "step ID P0 ID0 P1 ID1 ... P9 ID9" with the probabilities of
// the 10 most likely tokens (softmax of the raw logits over the whole vocabulary, in double);
// "end" after each prompt. The context is set up as llama-server's is for the real-model
// goldens (-c 4096 -np 1, threads as given, flash attention auto, f16 KV cache).
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s MODEL N_PREDICT N_THREADS < prompts\n", argv[0]);
        return 2;
    }
    const int n_predict = std::atoi(argv[2]);
    const int n_threads = std::atoi(argv[3]);
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_batch = 2048;
    cp.n_ubatch = 512;
    cp.n_seq_max = 1;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        std::fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    std::string line;
    std::vector<double> p(n_vocab);
    std::vector<int> order(n_vocab);
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::vector<llama_token> ids;
        for (long v; in >> v;) {
            ids.push_back((llama_token) v);
        }
        if (ids.empty()) {
            continue;
        }
        llama_memory_clear(llama_get_memory(ctx), true);
        if (llama_decode(ctx, llama_batch_get_one(ids.data(), (int32_t) ids.size())) != 0) {
            std::fprintf(stderr, "decode failed\n");
            return 1;
        }
        for (int step = 0; step < n_predict; step++) {
            const float * logits = llama_get_logits_ith(ctx, -1);
            double max = -INFINITY;
            for (int i = 0; i < n_vocab; i++) {
                max = std::max(max, (double) logits[i]);
            }
            double sum = 0;
            for (int i = 0; i < n_vocab; i++) {
                p[i] = std::exp((double) logits[i] - max);
                sum += p[i];
            }
            std::iota(order.begin(), order.end(), 0);
            // Ties go to the lower id, as a greedy argmax's first maximum does.
            std::partial_sort(order.begin(), order.begin() + 10, order.end(), [&](int a, int b) {
                return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
            });
            llama_token next = order[0];
            std::printf("step %d", next);
            for (int k = 0; k < 10; k++) {
                std::printf(" %.9g %d", p[order[k]] / sum, order[k]);
            }
            std::printf("\n");
            if (step + 1 < n_predict && llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) {
                std::fprintf(stderr, "decode failed\n");
                return 1;
            }
        }
        std::printf("end\n");
        std::fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
