#include "sampling.hpp"

#include <algorithm>

namespace pg {

SamplerPtr make_sampler(const llama_vocab * vocab, const SamplingConfig & cfg, int32_t n_ctx,
                        const std::vector<llama_token> & prompt) {
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    SamplerPtr chain(llama_sampler_chain_init(cp));

    const bool penalize = cfg.repeat_penalty != 1.0f || cfg.frequency_penalty != 0.0f || cfg.presence_penalty != 0.0f;
    const int32_t last_n = cfg.repeat_last_n < 0 ? n_ctx : cfg.repeat_last_n;
    if (penalize && last_n > 0) {
        llama_sampler * pen = llama_sampler_init_penalties(llama_vocab_n_tokens(vocab), last_n, cfg.repeat_penalty,
                                                           cfg.frequency_penalty, cfg.presence_penalty);
        // Only the penalty sampler sees the prompt: it is the one with a token history.
        const size_t start = prompt.size() > static_cast<size_t>(last_n) ? prompt.size() - last_n : 0;
        for (size_t i = start; i < prompt.size(); ++i) {
            llama_sampler_accept(pen, prompt[i]);
        }
        llama_sampler_chain_add(chain.get(), pen);
    }

    if (cfg.temperature <= 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
        return chain;
    }
    if (cfg.top_k > 0) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_top_k(cfg.top_k));
    }
    if (cfg.top_p < 1.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(cfg.top_p, 1));
    }
    if (cfg.min_p > 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_min_p(cfg.min_p, 1));
    }
    llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(cfg.temperature));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(cfg.seed));
    return chain;
}

}  // namespace pg
