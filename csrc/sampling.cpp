#include "sampling.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <regex>
#include <stdexcept>

#include "logging.hpp"
#include "scoring.hpp"

namespace pg {
namespace {

std::vector<float> & scratch_heap() {
    thread_local std::vector<float> heap;
    return heap;
}

void fill(std::vector<llama_token_data> & buf, const float * logits, int32_t n_vocab) {
    buf.resize(static_cast<size_t>(n_vocab));
    for (int32_t t = 0; t < n_vocab; ++t) {
        buf[static_cast<size_t>(t)] = llama_token_data{t, logits[t], 0.0f};
    }
}

llama_token pick(llama_sampler * s, std::vector<llama_token_data> & buf) {
    llama_token_data_array arr = {buf.data(), buf.size(), -1, false};
    llama_sampler_apply(s, &arr);
    if (arr.selected < 0 || static_cast<size_t>(arr.selected) >= arr.size) {
        throw std::runtime_error("the sampler chain selected no token");
    }
    return arr.data[arr.selected].id;
}

// A grammar sampler, lazy when there are trigger patterns; null when the grammar does
// not parse. Throws std::invalid_argument for a pattern std::regex rejects.
llama_sampler * make_grammar(const llama_vocab * vocab, const std::string & grammar,
                             const std::vector<std::string> & triggers) {
    if (triggers.empty()) {
        return llama_sampler_init_grammar(vocab, grammar.c_str(), "root");
    }
    std::vector<const char *> patterns;
    for (const auto & t : triggers) {
        patterns.push_back(t.c_str());
    }
    try {
        return llama_sampler_init_grammar_lazy_patterns(vocab, grammar.c_str(), "root", patterns.data(),
                                                        patterns.size(), nullptr, 0);
    } catch (const std::regex_error & e) {
        throw std::invalid_argument(std::string("a grammar trigger is not a valid regex: ") + e.what());
    }
}

}  // namespace

llama_token argmax(const float * logits, int32_t n) {
    // Lane-wise maxima first (the compiler vectorizes this), then the first index holding
    // the maximum: the same token as llama.cpp's scan, which keeps the first of equals.
    constexpr int32_t kLanes = 16;
    float             lane[kLanes];
    const int32_t     blocked = n / kLanes * kLanes;
    if (blocked == 0) {
        llama_token best = 0;
        for (int32_t t = 1; t < n; ++t) {
            best = logits[t] > logits[best] ? t : best;
        }
        return best;
    }
    for (int32_t j = 0; j < kLanes; ++j) {
        lane[j] = logits[j];
    }
    for (int32_t i = kLanes; i < blocked; i += kLanes) {
        for (int32_t j = 0; j < kLanes; ++j) {
            lane[j] = logits[i + j] > lane[j] ? logits[i + j] : lane[j];
        }
    }
    float mx = lane[0];
    for (int32_t j = 1; j < kLanes; ++j) {
        mx = lane[j] > mx ? lane[j] : mx;
    }
    for (int32_t t = blocked; t < n; ++t) {
        mx = logits[t] > mx ? logits[t] : mx;
    }
    for (int32_t t = 0; t < n; ++t) {
        if (logits[t] == mx) {
            return t;
        }
    }
    return 0;  // NaN logits: llama.cpp's scan also stays at 0
}

void prefilter_top_k(const float * logits, int32_t n, int32_t k, std::vector<llama_token_data> & out) {
    out.clear();
    k = std::min(k, n);
    // The k-th largest value: a min-heap of the k best so far; most logits fail the first
    // comparison, so this is one pass over the vocabulary.
    std::vector<float> & heap = scratch_heap();
    heap.assign(logits, logits + k);
    std::make_heap(heap.begin(), heap.end(), std::greater<float>());
    for (int32_t t = k; t < n; ++t) {
        if (logits[t] > heap.front()) {
            std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
            heap.back() = logits[t];
            std::push_heap(heap.begin(), heap.end(), std::greater<float>());
        }
    }
    const float kth = heap.front();
    for (int32_t t = 0; t < n; ++t) {
        if (logits[t] >= kth) {
            out.push_back(llama_token_data{t, logits[t], 0.0f});
        }
    }
}

Sampler::Sampler(const llama_vocab * vocab, const SamplingConfig & cfg, int32_t n_ctx,
                 const std::vector<llama_token> & prompt, bool backend)
    : n_vocab_(llama_vocab_n_tokens(vocab)), logprobs_(cfg.logprobs) {
    static std::atomic<uint64_t> serials{0};
    serial_ = ++serials;
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_.reset(llama_sampler_chain_init(cp));

    if (!cfg.logit_bias.empty()) {
        std::vector<llama_logit_bias> bias;
        for (const auto & [tok, b] : cfg.logit_bias) {
            bias.push_back({tok, b});
        }
        llama_sampler_chain_add(chain_.get(),
                                llama_sampler_init_logit_bias(n_vocab_, static_cast<int32_t>(bias.size()), bias.data()));
    }
    const bool penalize = cfg.repeat_penalty != 1.0f || cfg.frequency_penalty != 0.0f || cfg.presence_penalty != 0.0f;
    const int32_t last_n = cfg.repeat_last_n < 0 ? n_ctx : cfg.repeat_last_n;
    if (penalize && last_n > 0) {
        llama_sampler * pen = llama_sampler_init_penalties(n_vocab_, last_n, cfg.repeat_penalty,
                                                           cfg.frequency_penalty, cfg.presence_penalty);
        // Only the penalty sampler sees the prompt: it is the one with a token history.
        const size_t start = prompt.size() > static_cast<size_t>(last_n) ? prompt.size() - last_n : 0;
        for (size_t i = start; i < prompt.size(); ++i) {
            llama_sampler_accept(pen, prompt[i]);
        }
        llama_sampler_chain_add(chain_.get(), pen);
    }

    if (cfg.temperature <= 0.0f) {
        plain_greedy_ = cfg.logit_bias.empty() && !penalize && cfg.grammar.empty();
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_greedy());
    } else {
        if (cfg.top_k > 0) {
            top_k_ = cfg.logit_bias.empty() && !penalize ? cfg.top_k : 0;  // they change logits before it
            llama_sampler_chain_add(chain_.get(), llama_sampler_init_top_k(cfg.top_k));
        }
        if (cfg.top_p < 1.0f) {
            llama_sampler_chain_add(chain_.get(), llama_sampler_init_top_p(cfg.top_p, 1));
        }
        if (cfg.min_p > 0.0f) {
            llama_sampler_chain_add(chain_.get(), llama_sampler_init_min_p(cfg.min_p, 1));
        }
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_temp(cfg.temperature));
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_dist(cfg.seed));
    }

    backend_ = backend && cfg.grammar.empty() && cfg.logprobs < 0 && cfg.logit_bias.empty() && !penalize;

    if (!cfg.grammar.empty()) {
        lazy_ = !cfg.grammar_triggers.empty();
        grammar_.reset(make_grammar(vocab, cfg.grammar, cfg.grammar_triggers));
        if (!grammar_) {
            throw std::invalid_argument("the grammar does not parse");
        }
    }
}

llama_token Sampler::sample(llama_context * ctx, int32_t idx, std::vector<llama_token_data> & buf,
                            TokenLogprob * logprob_out) {
    if (!grammar_ && logprobs_ < 0 && !plain_greedy_ && top_k_ <= 0) {
        return llama_sampler_sample(chain_.get(), ctx, idx);  // llama.cpp's own path
    }
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (!logits) {
        throw std::runtime_error("no logits for output " + std::to_string(idx));
    }
    llama_token tok = 0;
    if (plain_greedy_) {
        // llama.cpp's greedy sampler, without first copying the vocabulary into a
        // candidate array (which takes longer than the scan).
        tok = argmax(logits, n_vocab_);
    } else if (top_k_ > 0) {
        // The chain's top-k keeps the k best whatever else the array holds: hand it those
        // only, instead of a copy of the whole vocabulary to sort from.
        prefilter_top_k(logits, n_vocab_, top_k_, buf);
        tok = pick(chain_.get(), buf);
    } else {
        fill(buf, logits, n_vocab_);
        tok = pick(chain_.get(), buf);
    }
    if (grammar_) {
        // Checking the one chosen token against the grammar is far cheaper than masking
        // the whole vocabulary; only when it is rejected is the full distribution
        // constrained and sampled again.
        llama_token_data       one = {tok, 1.0f, 0.0f};
        llama_token_data_array a1  = {&one, 1, -1, false};
        llama_sampler_apply(grammar_.get(), &a1);
        if (one.logit == -std::numeric_limits<float>::infinity()) {
            fill(buf, logits, n_vocab_);
            llama_token_data_array arr = {buf.data(), buf.size(), -1, false};
            llama_sampler_apply(grammar_.get(), &arr);
            tok = pick(chain_.get(), buf);
        }
        if (!lazy_) {
            llama_sampler_accept(grammar_.get(), tok);
        } else {
            try {
                llama_sampler_accept(grammar_.get(), tok);
            } catch (const std::exception &) {
                // The token that completed a trigger also carried text after it that the
                // grammar rejects (llama.cpp replays the whole token): this sequence goes
                // on unconstrained rather than failing every sequence of the batch.
                grammar_.reset();
            }
        }
    }
    llama_sampler_accept(chain_.get(), tok);

    if (logprob_out && logprobs_ >= 0) {
        const float lse      = log_sum_exp(logits, n_vocab_);
        logprob_out->logprob = logits[tok] - lse;
        logprob_out->top.clear();
        // The k best in one pass, best first; among equal logits the lower id first.
        const size_t k = std::min<size_t>(static_cast<size_t>(logprobs_), static_cast<size_t>(n_vocab_));
        auto &       top = logprob_out->top;
        for (int32_t t = 0; t < n_vocab_ && k > 0; ++t) {
            if (top.size() == k && !(logits[t] > top.back().second)) {
                continue;
            }
            auto at = std::upper_bound(top.begin(), top.end(), logits[t],
                                       [](float v, const std::pair<int32_t, float> & e) { return v > e.second; });
            top.insert(at, {t, logits[t]});
            if (top.size() > k) {
                top.pop_back();
            }
        }
        for (auto & e : top) {
            e.second -= lse;
        }
    }
    return tok;
}

llama_sampler * Sampler::chain_to_attach() {
    if (attached_) {
        chain_.reset(llama_sampler_clone(chain_.get()));
    }
    attached_ = true;
    return chain_.get();
}

llama_token Sampler::take_backend_token(llama_context * ctx, int32_t idx) {
    const llama_token tok = llama_get_sampled_token_ith(ctx, idx);
    if (tok != LLAMA_TOKEN_NULL) {
        llama_sampler_accept(chain_.get(), tok);  // the dist sampler's draws advance here
    }
    return tok;
}

std::string grammar_error(const llama_vocab * vocab, const std::string & grammar) {
    install_log_router();
    LogScope scope(false);
    llama_sampler * s = llama_sampler_init_grammar(vocab, grammar.c_str(), "root");
    if (s) {
        llama_sampler_free(s);
        take_log_errors();
        return "";
    }
    std::string why = take_log_errors();
    return why.empty() ? "the grammar does not parse" : why;
}

}  // namespace pg
