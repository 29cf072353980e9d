#include "engine.hpp"

#include <algorithm>
#include <chrono>
#include <exception>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdexcept>
#include <thread>
#include <cstdlib>
#include <tuple>

#include "logging.hpp"

namespace pg {

// A prompt prefix that several waiting sequences start with: decoded once into a KV stream
// no sequence runs in, then copied into each user's KV when the user is admitted. Once its
// last user is in, the stream keeps it as a prompt cache entry (when the cache is on).
struct Engine::SharedPrefix {
    std::vector<llama_token> tokens;
    llama_seq_id             seq_id = -1;
    int32_t                  n_past = 0;  // tokens decoded so far
    int32_t                  users  = 0;  // queued sequences that will copy it

    int32_t size() const { return static_cast<int32_t>(tokens.size()); }
    bool    decoded() const { return n_past == size(); }
    int32_t to_feed() const { return size() - n_past; }
    // Each user keeps at least one token of its own: its logits give the first output.
    bool starts(const std::vector<llama_token> & t) const {
        return t.size() > tokens.size() && std::equal(tokens.begin(), tokens.end(), t.begin());
    }
};

struct Engine::Entry {
    Sequence *   seq;     // nullptr: a token of the shared prefix, or a padding row
    llama_token  token;
    llama_pos    pos;
    bool         logits;  // sample (or score) after this token
    bool         prompt;  // counted as prompt work in the timing split
    llama_seq_id padding = -1;  // >= 0: a dummy row in this (empty) stream, dropped after the call
};

// A sequence's token drawn from a decode's logits, before the engine takes it (stops,
// finishing): drawing runs on several threads, taking on the engine's.
struct Engine::Draw {
    llama_token        token = 0;
    TokenLogprob       logprob;
    std::exception_ptr error;
};

namespace {

using Clock = std::chrono::steady_clock;
using kv_cost::kCopyTokens;

int32_t common_prefix(const llama_token * a, int32_t na, const std::vector<llama_token> & b, int32_t cap) {
    const int32_t n = std::min({na, static_cast<int32_t>(b.size()), cap});
    int32_t       k = 0;
    while (k < n && a[k] == b[static_cast<size_t>(k)]) {
        ++k;
    }
    return k;
}

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string decode_error_text(int32_t code) {
    switch (code) {
        case 2:  return "llama_decode was aborted (code 2)";
        case -1: return "llama_decode rejected the batch as invalid (code -1)";
        case -2: return "llama_decode could not allocate compute or KV memory (code -2)";
        case -3: return "llama_decode compute failed (code -3)";
        default: return "llama_decode failed (code " + std::to_string(code) + ")";
    }
}

}  // namespace

std::atomic<int32_t> Engine::alive_{0};

int32_t kv_streams(const EngineConfig & cfg) {
    if (cfg.min_rows > 0) {
        return std::max(cfg.n_parallel, cfg.min_rows);
    }
    const bool extra = cfg.min_prefix < INT32_MAX || cfg.prompt_cache;
    return std::min(cfg.n_parallel + (extra ? 1 : 0), std::max(cfg.n_parallel, int32_t(llama_max_parallel_sequences())));
}

Engine::Engine(std::shared_ptr<ModelHandle> model, const EngineConfig & cfg) : model_(std::move(model)), cfg_(cfg) {
    if (cfg_.n_parallel < 1 || cfg_.n_ctx < 2 || cfg_.n_batch < cfg_.n_parallel) {
        throw std::invalid_argument("engine config: need n_parallel >= 1, n_ctx >= 2, n_batch >= n_parallel");
    }
    if (batch_invariant() && cfg_.backend_sampling) {
        throw std::invalid_argument("engine config: batch-invariant mode samples on the host (no backend sampling)");
    }
    if (batch_invariant() && (cfg_.kv_unified || sharing_prefixes() || caching() || cfg_.n_batch < cfg_.min_rows)) {
        throw std::invalid_argument("engine config: batch-invariant mode needs separate KV streams, no shared "
                                    "prefix, no prompt cache and n_batch >= min_rows");
    }
    install_log_router();
    LogScope scope(cfg_.verbose);

    llama_context_params cp = llama_context_default_params();
    // One stream more than slots when prefixes are shared or prompts cached: a shared
    // prefix is decoded into a stream no sequence runs in, and when every slot is busy the
    // cache still keeps one entry (and close_gaps a place to keep one while it moves a
    // sequence). At llama.cpp's sequence limit there is none: prefixes and the cache use
    // free slots only. In a unified pool streams are only seq ids: cells are shared.
    // Batch-invariant mode (neither) pads steps with dummy rows, each in an empty stream
    // of its own (free slots first): streams up to min_rows when there are fewer slots.
    const int32_t n_seq = kv_streams(cfg_);
    const int64_t total = cfg_.kv_unified ? (cfg_.kv_size > 0 ? int64_t(cfg_.kv_size)
                                                              : int64_t(cfg_.n_ctx) * cfg_.n_parallel)
                                          : int64_t(cfg_.n_ctx) * n_seq;
    if (total > INT32_MAX) {
        throw std::invalid_argument("n_ctx * n_parallel is too large");
    }
    int32_t threads = cfg_.n_threads > 0 ? cfg_.n_threads : static_cast<int32_t>(std::thread::hardware_concurrency());
    threads    = std::max(threads, 1);
    n_threads_ = threads;
    candidates_.resize(static_cast<size_t>(threads));
    cp.n_ctx           = static_cast<uint32_t>(total);
    cp.n_batch         = static_cast<uint32_t>(cfg_.n_batch);
    cp.n_ubatch        = static_cast<uint32_t>(cfg_.n_batch);
    cp.n_seq_max       = static_cast<uint32_t>(n_seq);
    cp.n_threads       = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = static_cast<llama_flash_attn_type>(cfg_.flash_attn);
    cp.type_k          = static_cast<ggml_type>(cfg_.type_k);
    cp.type_v          = static_cast<ggml_type>(cfg_.type_v);
    cp.kv_unified      = cfg_.kv_unified;
    cp.no_perf         = true;
    if (cfg_.backend_sampling) {
        // A sampling sequence has one output per decode (its last token fed): backend
        // samplers then keep one set of inputs each instead of one per possible output.
        cp.n_outputs_max_per_seq = 1;
    }
    cp.abort_callback      = &Engine::abort_cb;
    cp.abort_callback_data = this;

    ctx_ = llama_init_from_model(model_->get(), cp);
    if (!ctx_) {
        std::string why = take_log_errors();
        throw std::runtime_error("llama.cpp could not create a context" + (why.empty() ? "" : ": " + why));
    }
    mem_     = llama_get_memory(ctx_);
    n_batch_ = static_cast<int32_t>(llama_n_batch(ctx_));
    if (n_ctx_seq() < cfg_.n_ctx || static_cast<int32_t>(llama_n_seq_max(ctx_)) < n_seq ||
        n_batch_ < cfg_.n_parallel) {
        llama_free(ctx_);
        throw std::runtime_error("llama.cpp gave a smaller context than asked for (n_ctx_seq " +
                                 std::to_string(n_ctx_seq()) + " < " + std::to_string(cfg_.n_ctx) + ")");
    }
    batch_ = llama_batch_init(n_batch_, 0, 1);
    n_seq_ = n_seq;
    n_swa_ = std::max(0, static_cast<int32_t>(llama_model_n_swa(model_->get())));
    streams_.resize(n_seq_);
    if (caching() && cfg_.cache_ram > 0) {
        host_ = std::make_unique<HostCache>(static_cast<size_t>(cfg_.cache_ram));
    }
    // KV state restores only into a context laid out as the one it came from (llama.cpp
    // checks layers, types and stream count itself; this also ties it to the weights).
    char desc[256] = {0};
    llama_model_desc(model_->get(), desc, sizeof(desc));
    fingerprint_ = std::string(desc) + "|params=" + std::to_string(llama_model_n_params(model_->get())) +
                   "|bytes=" + std::to_string(llama_model_size(model_->get())) +
                   "|layers=" + std::to_string(llama_model_n_layer(model_->get())) +
                   "|embd=" + std::to_string(llama_model_n_embd(model_->get())) +
                   "|vocab=" + std::to_string(model_->n_vocab()) + "|swa=" + std::to_string(n_swa_) +
                   "|type_k=" + std::to_string(cfg_.type_k) + "|type_v=" + std::to_string(cfg_.type_v) +
                   "|unified=" + std::to_string(cfg_.kv_unified) + "|streams=" + std::to_string(n_seq_) +
                   "|n_ctx_seq=" + std::to_string(n_ctx_seq()) + "|flash_attn=" + std::to_string(cfg_.flash_attn);
    ++alive_;
}

Engine::~Engine() {
    --alive_;
    LogScope scope(cfg_.verbose);  // llama.cpp reports buffer sizes on free
    if (batch_.token) {
        llama_batch_free(batch_);
    }
    if (ctx_) {
        llama_free(ctx_);
    }
}

int64_t Engine::kv_tokens() const {
    int64_t total = 0;
    for (int32_t id = 0; id < n_seq_; ++id) {
        total += llama_memory_seq_pos_max(mem_, id) + 1 - static_cast<int64_t>(streams_.entry(id).size());
    }
    return total;
}

int64_t Engine::cached_tokens() const { return streams_.cached_tokens(); }

int64_t Engine::host_tokens() const {
    int64_t total = 0;
    if (host_) {
        for (int64_t id : host_->ids()) {
            total += static_cast<int64_t>(host_->get(id)->tokens.size());
        }
    }
    return total;
}

std::vector<std::string> Engine::export_host() const {
    std::vector<std::string> out;
    if (host_) {
        for (int64_t id : host_->ids()) {
            out.push_back(HostCache::pack(*host_->get(id), fingerprint_));
        }
    }
    return out;
}

bool Engine::import_host(const std::string & bytes) {
    HostEntry e;
    if (!host_ || !HostCache::unpack(bytes, fingerprint_, e)) {
        return false;
    }
    const int64_t evicted = host_->evictions();
    const bool    ok      = host_->put(std::move(e)) != HostCache::Put::TooLarge;
    counters_.host_cache_evictions += host_->evictions() - evicted;
    return ok;
}

int32_t Engine::n_ctx_seq() const { return static_cast<int32_t>(llama_n_ctx_seq(ctx_)); }
int32_t Engine::kv_capacity() const { return static_cast<int32_t>(llama_n_ctx(ctx_)); }

bool Engine::flash_attn() const {
    // llama.cpp resolves "auto" at context creation; the effective choice is in the
    // context's params, which the C API does not expose, so report what was asked.
    return cfg_.flash_attn == 1;
}

bool Engine::abort_cb(void * data) {
    return static_cast<Engine *>(data)->abort_now_.load(std::memory_order_relaxed);
}

Failure Engine::check(const Item & item) const {
    const int32_t n_prompt = static_cast<int32_t>(std::min<size_t>(item.tokens.size(), INT32_MAX));
    if (n_prompt == 0) {
        return {ErrorCode::EmptyPrompt, "the prompt is empty: it has no tokens to start from"};
    }
    const int32_t n_vocab = model_->n_vocab();
    for (llama_token t : item.tokens) {
        if (t < 0 || t >= n_vocab) {
            return {ErrorCode::InvalidPrompt, "the prompt has token id " + std::to_string(t) +
                                                  ", outside the vocabulary of " + std::to_string(n_vocab)};
        }
    }
    if (!item.params.continuations.empty()) {
        return ContinuationScorer::check(item.params.continuations, n_vocab, n_prompt, cfg_.n_ctx);
    }
    if (n_prompt >= cfg_.n_ctx) {
        return {ErrorCode::PromptTooLong,
                "the prompt has " + std::to_string(n_prompt) + " tokens but a sequence holds n_ctx=" +
                    std::to_string(cfg_.n_ctx) +
                    " tokens (prompt + output); shorten it or open the model with a larger n_ctx"};
    }
    return {};
}

void Engine::submit(Item item) {
    LogScope scope(cfg_.verbose);
    auto s      = std::make_unique<Sequence>();
    s->text     = TextAssembler(item.params.stop);
    Failure why = check(item);
    s->tokens   = std::move(item.tokens);
    s->n_prompt = static_cast<int32_t>(s->tokens.size());
    s->item      = std::move(item);
    if (!why && !s->item.params.continuations.empty()) {
        s->scorer = std::make_unique<ContinuationScorer>(std::move(s->item.params.continuations));
        s->item.params.continuations.clear();
    }
    if (!why && !s->scorer) {
        try {
            s->sampler = std::make_unique<Sampler>(model_->vocab(), s->item.params, cfg_.n_ctx, s->tokens,
                                                   cfg_.backend_sampling);
        } catch (const std::exception & e) {
            why = {ErrorCode::InvalidParam, std::string("could not build the sampler: ") + e.what()};
        }
    }
    if (why) {
        finish(s.get(), Finish::Error, std::move(why));
        ready_.push_back(to_result(*s));
        return;
    }
    if (prefix_ && s->item.params.cache_prompt && prefix_->starts(s->tokens)) {
        s->prefix_user = true;  // prompts fed in one by one keep an active prefix alive
        ++prefix_->users;
    }
    waiting_.push_back(std::move(s));
    no_prefix_head_ = nullptr;  // a new prompt may share a prefix with the queue head
}

int64_t Engine::kv_used_estimate() const {
    int64_t used = prefix_ ? prefix_->n_past : 0;
    for (int32_t id = 0; id < n_seq_; ++id) {
        const Sequence * s = streams_.seq(id);
        used += s && s->running() ? s->n_past : static_cast<int64_t>(streams_.entry(id).size());
    }
    return used;
}

// -- the prompt cache ---------------------------------------------------------------------

// What stream `id` holds now (the table's index may lag a running sequence by a step: it is
// a hint, this is what KV is reused by).
Held Engine::held(llama_seq_id id) const {
    const Sequence * s = streams_.seq(id);
    if (s && s->running()) {
        return {s->tokens.data(), s->n_past};
    }
    if (prefix_ && prefix_->seq_id == id) {
        return {prefix_->tokens.data(), prefix_->n_past};
    }
    const auto & c = streams_.entry(id);
    return {c.data(), static_cast<int32_t>(c.size())};
}

// How many leading tokens of `t` (at most `cap`) stream `id` holds KV for, and can give:
// a sliding-window layer drops cells that fall out of its window, and the next token needs
// the last window of them, so a prefix whose window is gone there is worth nothing.
int32_t Engine::reusable(llama_seq_id id, const std::vector<llama_token> & t, int32_t cap) const {
    const Held    h = held(id);
    const int32_t n = common_prefix(h.data, h.n, t, cap);
    if (n > 0 && n_swa_ > 0) {
        const llama_pos lo = llama_memory_seq_pos_min(mem_, id);
        if (lo < 0 || lo > std::max(0, n - n_swa_)) {
            return 0;
        }
    }
    return n;
}

std::string Engine::check_streams() {
    sync_streams();
    std::string why = streams_.check();
    int32_t     live = 0;
    for (int32_t id = 0; id < n_seq_ && why.empty(); ++id) {
        const Sequence * s = streams_.seq(id);
        live += s ? 1 : 0;
        const Held a = held(id), b = streams_.held(id);
        if (s && s->seq_id != id) {
            why = "stream " + std::to_string(id) + " holds the sequence of seq id " + std::to_string(s->seq_id);
        } else if (a.n != b.n || !std::equal(a.data, a.data + a.n, b.data)) {
            why = "stream " + std::to_string(id) + ": the table holds other tokens than the engine reads";
        }
    }
    if (why.empty() && live != n_live_) {
        why = std::to_string(live) + " streams hold a sequence, " + std::to_string(n_live_) + " live";
    }
    if (why.empty() && streams_.prefix() != (prefix_ ? prefix_->seq_id : -1)) {
        why = "the prefix's stream differs";
    }
    return why;
}

// The cached tokens of stream `id` past its first `keep` that no other stream holds: what
// overwriting it from `keep` on loses.
int32_t Engine::loss(llama_seq_id id, int32_t keep) const {
    const int32_t n = static_cast<int32_t>(streams_.entry(id).size());
    return std::max(0, std::min(n - keep, streams_.lost(id)));
}

// Running sequences and the prefix decoded tokens since the index last looked.
void Engine::sync_streams() {
    if (prefix_) {
        streams_.prefix_decoded(prefix_->n_past);
    }
    streams_.sync();
}

// The stream (any: a copy source) holding more than `floor` leading tokens of `t` (at most
// `cap`), the most it can: the index proposes, reusable() confirms. kMaxVisits bounds the
// walk where proposals fail (a sliding window's lost cells, a snapshot a step old).
StreamMatch Engine::best_source(const std::vector<llama_token> & t, int32_t cap, int32_t floor) const {
    constexpr int32_t kMaxVisits = 16;
    StreamMatch       out;
    streams_.longest(
        t.data(), static_cast<int32_t>(t.size()), cap, /*free_only=*/false,
        [&](int32_t id, int32_t k) {
            if (k <= std::max(floor, out.n)) {
                return true;  // nothing farther out holds more
            }
            const int32_t r = reusable(id, t, cap);
            if (r > std::max(floor, out.n)) {
                out = {id, r};
            }
            return r >= k;
        },
        kMaxVisits);
    return out;
}

// With one KV stream per sequence, live seq ids must be consecutive (see close_gaps). The
// window [first, first + n) of streams the live sequences (and `grow` sequences about to be
// admitted) can gather in at least cost, in tokens: a move (a stream copy) per live
// sequence outside it, and per hole inside it that caches something, a copy to keep that
// elsewhere (into a free stream out of the window that loses nothing) or the tokens lost.
// O(n_seq): once per admission (for the newcomer, grow 1) and per move of close_gaps.
Engine::GapPlan Engine::gap_plan(int32_t grow) const {
    GapPlan plan;
    if (cfg_.kv_unified) {
        return plan;
    }
    // Every window costs O(1) from prefix sums over the stream ids.
    // holes[i], spares[i], lossy[i]: holes, spare streams and lossy holes among ids < i;
    // lost_sum[j]: tokens lost by the first j lossy holes, in id order.
    const size_t n_ids = static_cast<size_t>(n_seq_);
    std::vector<int32_t> holes(n_ids + 1, 0), spares(n_ids + 1, 0), lossy(n_ids + 1, 0);
    std::vector<int64_t> lost_sum(1, 0);
    for (int32_t id = 0; id < n_seq_; ++id) {
        const size_t i    = static_cast<size_t>(id);
        const bool    hole = streams_.seq(id) == nullptr;
        const int32_t lost = streams_.lost(id);
        const bool    lose = hole && lost > 0;
        holes[i + 1]  = holes[i] + (hole ? 1 : 0);
        spares[i + 1] = spares[i] + (hole && streams_.is_free(id) && lost == 0 ? 1 : 0);
        lossy[i + 1]  = lossy[i] + (lose ? 1 : 0);
        if (lose) {
            lost_sum.push_back(lost_sum.back() + lost);
        }
    }
    const int32_t n = std::min(n_seq_, n_seq_ - holes[n_ids] + grow);  // live sequences and newcomers
    if (n == 0 || n == grow) {
        return plan;
    }
    const llama_seq_id pinned = prefix_ ? prefix_->seq_id : -1;  // the shared prefix cannot move
    plan.cost = INT64_MAX;
    for (int32_t first = 0; first + n <= n_seq_; ++first) {
        const int32_t last = first + n;
        if (pinned >= first && pinned < last) {
            continue;
        }
        const size_t f = static_cast<size_t>(first), l = static_cast<size_t>(last);
        // a move per hole inside; per lossy hole, a copy into a spare stream outside (lowest
        // ids first) while there are spares, else its tokens lost
        const int32_t spare   = spares[n_ids] - (spares[l] - spares[f]);
        const int32_t a       = lossy[f], b = lossy[l];
        const int32_t covered = std::min(spare, b - a);
        const int64_t cost    = int64_t(holes[l] - holes[f] + covered) * kCopyTokens +
                             (lost_sum[static_cast<size_t>(b)] - lost_sum[static_cast<size_t>(a + covered)]);
        if (cost < plan.cost) {
            plan.cost  = cost;
            plan.first = first;
            plan.n     = n;
        }
    }
    if (plan.cost == INT64_MAX) {
        plan = GapPlan{};  // no window without the prefix in it: leave the ids as they are
    }
    return plan;
}

// Where a prompt `t` starts, reusing at most `cap` of its tokens: in place in a free stream
// that holds a prefix of it, or copied from whichever stream holds the longest (running
// sequences' included) into a victim, or restored from host memory into the victim, or from
// nothing; whichever saves the most decoding (placement.hpp weighs them). `reuse`: the cache
// may be used; else only `prefix_src` (a shared prefix), if >= 0. `live`: a sequence (its id
// should join the live ones'); else a shared prefix (out of their way: the highest free id).
//
// The victim: a free stream that loses nothing (inside the window the live ids gather in
// first), else the least recently used entry. The stream table answers each question from
// an index: O(log n_seq) set operations and O(prompt length) token comparisons, plus one
// O(n_seq) pass of integer sums for the window (gap_plan).
Engine::Placement Engine::place(const std::vector<llama_token> & t, int32_t cap, bool reuse, llama_seq_id prefix_src,
                                bool live) const {
    llama_seq_id src  = prefix_src;  // on a tie the shared prefix, decoded for this very prompt
    int32_t      best = prefix_src >= 0 ? reusable(prefix_src, t, cap) : 0;
    if (reuse) {
        const StreamMatch m = best_source(t, cap, best);
        if (m.n > best) {
            src  = m.id;
            best = m.n;
        }
    }
    const GapPlan window = live ? gap_plan(1) : GapPlan{};
    // A stream outside the window the live ids gather in costs a move later (close_gaps).
    auto gap = [&](llama_seq_id id) -> int64_t {
        return window.n > 0 && (id < window.first || id >= window.first + window.n) ? kCopyTokens : 0;
    };
    PlaceChoice        choice(cfg_.kv_unified);
    const llama_seq_id v = streams_.victim(src, window.first, window.first + window.n, /*low=*/live);
    if (v >= 0) {
        const int32_t l = streams_.lost(v);
        choice.consider({v, KvFrom::Nothing, -1, 0, l, gap(v)});
        if (src >= 0 && best > 0) {
            choice.consider({v, KvFrom::Copy, src, best, l, gap(v)});
        }
        // From host memory: into the victim, unless a queued copy still reads or writes it.
        const HostHit h = reuse && !streams_.copy_pending(v) ? host_lookup(t, cap) : HostHit{};
        if (h.n > best) {
            choice.consider({v, KvFrom::Host, -1, h.n, l, gap(v), h.id});
        }
    }
    if (reuse) {
        // In place: free streams holding a prefix of t, longest first, while one could still
        // be worth more than the choice so far (an option is worth at most what it reuses).
        constexpr int32_t kMaxInPlace = 8;
        streams_.longest(
            t.data(), static_cast<int32_t>(t.size()), cap, /*free_only=*/true,
            [&](int32_t id, int32_t k) {
                if (choice.any() && k <= choice.value()) {
                    return true;
                }
                const int32_t n = id == src ? best : reusable(id, t, cap);
                if (n > 0) {
                    choice.consider({id, KvFrom::InPlace, id, n, loss(id, n), gap(id)});
                }
                return false;
            },
            kMaxInPlace);
    }
    return choice.best();
}

// Makes free stream p.stream hold the KV of the first p.reuse tokens and nothing else.
// Returns how many it holds: 0 where llama.cpp cannot cut the stream (recurrent memory).
int32_t Engine::fill(const Placement & p) {
    const llama_seq_id id = p.stream;
    int32_t            n  = p.reuse;
    if (p.host >= 0) {
        host_->touch(p.host);  // the most recent: the spill below makes room elsewhere
    }
    if (p.lost > 0) {
        spill(id);  // what only this stream holds goes to host memory first
    }
    if (p.lost > 0 && (p.source != id || p.lost > n)) {
        ++counters_.prompt_cache_evictions;  // in place, evicted when less is reused than lost
    }
    if (p.host >= 0) {
        n = restore(id, HostHit{p.host, n});
    } else if (n == 0) {
        llama_memory_seq_rm(mem_, id, -1, -1);
    } else if (p.source != id) {
        llama_memory_seq_rm(mem_, id, -1, -1);
        if (cfg_.kv_unified) {
            llama_memory_seq_cp(mem_, p.source, id, 0, n);  // the cells gain a seq id
        } else {
            copy_stream(p.source, id);  // whole streams only
        }
        ++counters_.kv_copies;
        streams_.touch(p.source);
    }
    if (n > 0 && !llama_memory_seq_rm(mem_, id, n, -1)) {
        llama_memory_seq_rm(mem_, id, -1, -1);
        n = 0;
    }
    streams_.drop(id);
    return n;
}

// Stream `id` (no sequence runs in it any more) keeps the KV of `data[0, n)` for later prompts.
void Engine::keep_cached(llama_seq_id id, const llama_token * data, int32_t n) { streams_.keep(id, data, n); }

// Drops the least recently used cache entry (not in spare_a or spare_b); false if none.
bool Engine::evict_one(llama_seq_id spare_a, llama_seq_id spare_b) {
    const llama_seq_id oldest = streams_.oldest_entry(spare_a, spare_b);
    if (oldest < 0) {
        return false;
    }
    spill(oldest);
    llama_memory_seq_rm(mem_, oldest, -1, -1);
    streams_.drop(oldest);
    ++counters_.prompt_cache_evictions;
    return true;
}

void Engine::clear_cache() {
    for (int32_t id = 0; id < n_seq_; ++id) {
        if (!streams_.entry(id).empty()) {
            llama_memory_seq_rm(mem_, id, -1, -1);
            streams_.drop(id);
        }
    }
}

// -- the host tier ---------------------------------------------------------------------------

// The host entry holding the longest prefix of `t` (at most `cap` tokens) that a stream can
// start from: with a sliding window, one whose cells of the last window before it were kept.
Engine::HostHit Engine::host_lookup(const std::vector<llama_token> & t, int32_t cap) const {
    if (!host_) {
        return {};
    }
    const HostMatch m = host_->longest(t.data(), static_cast<int32_t>(t.size()), cap);
    if (m.id < 0 || (n_swa_ > 0 && host_->get(m.id)->pos_min > std::max(0, m.n - n_swa_))) {
        return {};
    }
    return {m.id, m.n};
}

// Free stream `id`'s cache entry is about to be dropped or overwritten: its tokens and KV
// state go to host memory (unless held there already, or too short to be worth a restore).
void Engine::spill(llama_seq_id id) {
    const auto &   c = streams_.entry(id);
    const int32_t  n = static_cast<int32_t>(c.size());
    if (!host_ || n < host_->block() || streams_.copy_pending(id)) {
        return;
    }
    const HostMatch m = host_->longest(c.data(), n, n);
    if (m.id >= 0 && m.n == n) {
        host_->touch(m.id);
        return;
    }
    const auto t0 = Clock::now();
    HostEntry  e;
    e.state.resize(llama_state_seq_get_size_ext(ctx_, id, LLAMA_STATE_SEQ_FLAGS_NONE));
    const size_t got = e.state.empty() ? 0
                       : llama_state_seq_get_data_ext(ctx_, e.state.data(), e.state.size(), id,
                                                      LLAMA_STATE_SEQ_FLAGS_NONE);
    if (got == e.state.size() && got > 0) {
        e.tokens  = c;
        e.pos_min = std::max(0, static_cast<int32_t>(llama_memory_seq_pos_min(mem_, id)));
        const int64_t evicted = host_->evictions();
        if (host_->put(std::move(e)) == HostCache::Put::Stored) {
            ++counters_.host_cache_saves;
            counters_.host_saved_tokens += n;
        }
        counters_.host_cache_evictions += host_->evictions() - evicted;
    }
    counters_.host_save_seconds += seconds_since(t0);
}

// Free stream `id` gets the KV of host entry hit.id, cut to its first hit.n tokens by the
// caller. Returns hit.n, or 0 where llama.cpp refused the state (the entry is dropped and
// the prompt decoded instead).
int32_t Engine::restore(llama_seq_id id, const HostHit & hit) {
    const auto        t0 = Clock::now();
    const HostEntry * e  = host_->get(hit.id);  // gone if the spill before it needed its room
    llama_memory_seq_rm(mem_, id, -1, -1);
    int32_t n = hit.n;
    if (!e) {
        n = 0;
    } else if (llama_state_seq_set_data_ext(ctx_, e->state.data(), e->state.size(), id,
                                            LLAMA_STATE_SEQ_FLAGS_NONE) == 0) {
        take_log_errors();  // llama.cpp said why in its log; the prompt is decoded instead
        llama_memory_seq_rm(mem_, id, -1, -1);
        host_->erase(hit.id);
        ++counters_.host_restore_failures;
        n = 0;
    } else {
        host_->touch(hit.id);
        ++counters_.host_cache_hits;
        counters_.host_cached_tokens += n;
    }
    counters_.host_restore_seconds += seconds_since(t0);
    return n;
}

// A whole-stream copy, queued by llama.cpp until the next decode.
void Engine::copy_stream(llama_seq_id src, llama_seq_id dst) {
    llama_memory_seq_cp(mem_, src, dst, -1, -1);
    streams_.mark_copy(src);
    streams_.mark_copy(dst);
}

bool Engine::keeps_kv(const Sequence & s) const {
    return caching() && s.item.params.cache_prompt;
}

// -- admission and the shared prefix --------------------------------------------------------

// Picks the prompt prefix that saves the most decoding: the head of the queue shares
// L tokens with k waiting prompts, saving L * (k - 1) tokens. Each user keeps at least
// one prompt token of its own, whose logits give its first output token. A prefix the
// prompt cache already holds (but for fewer than min_prefix tokens) is not decoded again:
// the prompts reuse the cached one.
void Engine::choose_prefix() {
    if (!sharing_prefixes() || prefix_ || prefix_backoff_ || waiting_.size() < 2 ||
        waiting_.front().get() == no_prefix_head_ || !waiting_.front()->item.params.cache_prompt) {
        return;
    }
    const Sequence &     head = *waiting_.front();
    std::vector<int32_t> shares;
    shares.reserve(waiting_.size());
    for (const auto & w : waiting_) {
        const int32_t cap = w->item.params.cache_prompt ? std::min(head.n_prompt, w->n_prompt) - 1 : 0;
        shares.push_back(common_prefix(head.tokens.data(), head.n_prompt, w->tokens, cap));
    }
    std::vector<int32_t> sorted = shares;
    std::sort(sorted.begin(), sorted.end(), std::greater<int32_t>());
    int32_t best_len = 0;
    int64_t best_saving = 0;
    for (size_t i = 1; i < sorted.size(); ++i) {
        const int64_t saving = int64_t(sorted[i]) * int64_t(i);
        if (sorted[i] >= cfg_.min_prefix && saving > best_saving) {
            best_saving = saving;
            best_len    = sorted[i];
        }
    }
    int32_t cached = 0;
    if (best_len > 0 && caching()) {
        cached = std::max(best_source(head.tokens, best_len, 0).n, host_lookup(head.tokens, best_len).n);
    }
    if (best_len - cached < cfg_.min_prefix) {
        no_prefix_head_ = waiting_.front().get();  // nothing to share: don't rescan each step
        return;
    }
    std::vector<llama_token> tokens(head.tokens.begin(), head.tokens.begin() + best_len);
    const Placement          p = place(tokens, best_len, caching(), -1, /*live=*/false);
    if (p.stream < 0) {
        return;  // every stream is taken
    }
    prefix_         = std::make_unique<SharedPrefix>();
    prefix_->tokens = std::move(tokens);
    prefix_->seq_id = p.stream;
    prefix_->n_past = fill(p);
    streams_.set_prefix(p.stream, prefix_->tokens.data(), prefix_->n_past);
    if (caching()) {  // the prefix's own lookup; its users count as neither hits nor misses
        counters_.cached_prompt_tokens += prefix_->n_past;
        ++(prefix_->n_past > 0 ? counters_.prompt_cache_hits : counters_.prompt_cache_misses);
    }
    for (size_t i = 0; i < waiting_.size(); ++i) {
        if (shares[i] >= best_len) {
            waiting_[i]->prefix_user = true;
            ++prefix_->users;
        }
    }
}

bool Engine::uses_prefix(const Sequence & s) const {
    return prefix_ && s.prefix_user && s.n_past == 0 && prefix_->starts(s.tokens);
}

// The prefix is no longer needed for its users. `keep`: its stream keeps what was decoded
// of it as a prompt cache entry (when the cache is on); else its KV is removed.
void Engine::drop_prefix(bool keep) {
    if (!prefix_) {
        return;
    }
    const llama_seq_id id = prefix_->seq_id;
    const int32_t      n  = prefix_->n_past;
    streams_.clear_prefix();
    std::vector<llama_token> tokens = std::move(prefix_->tokens);
    prefix_.reset();
    if (keep && caching() && n > 0) {
        keep_cached(id, tokens.data(), n);
    } else {
        llama_memory_seq_rm(mem_, id, -1, -1);
    }
    for (auto & w : waiting_) {
        w->prefix_user = false;
    }
}

void Engine::admit() {
    if (!waiting_.empty()) {
        sync_streams();
    }
    // Each round admits under one shared prefix; when its last user is in, the queue may
    // hold the next group (say, the n samples of the next prompt): choose again.
    for (;;) {
        choose_prefix();
        admit_round();
        if (!prefix_ || prefix_->users > 0) {
            return;
        }
        drop_prefix(/*keep=*/true);
        if (waiting_.empty() || n_live_ >= cfg_.n_parallel) {
            return;
        }
    }
}

void Engine::admit_round() {
    while (!waiting_.empty() && n_live_ < cfg_.n_parallel) {
        Sequence & s = *waiting_.front();
        const bool user = uses_prefix(s);
        if (user && !prefix_->decoded()) {
            break;  // its prefix is still being decoded: a step or two
        }
        const int32_t   cap = static_cast<int32_t>(s.tokens.size()) - 1;  // logits need a token fed
        const Placement p   = place(s.tokens, cap, keeps_kv(s), user ? prefix_->seq_id : -1, /*live=*/true);
        if (p.stream < 0) {
            break;
        }
        if (cfg_.kv_unified) {
            // A shared pool can be smaller than n_parallel * n_ctx: cached entries go first
            // (least recently used first), then admit only what fits now, so sequences wait
            // in the queue instead of thrashing the cache.
            const int64_t need = static_cast<int64_t>(s.tokens.size()) + 1 -
                                 static_cast<int64_t>(streams_.entry(p.stream).size()) -
                                 (p.source >= 0 && p.source != p.stream ? p.reuse : 0);
            while (kv_used_estimate() + need > kv_capacity() && evict_one(p.stream, p.source)) {
            }
            if (n_live_ > 0 && kv_used_estimate() + need > kv_capacity()) {
                break;
            }
        }
        s.seq_id      = p.stream;
        s.admitted_at = ++admit_clock_;
        s.state       = SeqState::Prefilling;
        s.n_past      = fill(p);
        if (user && p.source == prefix_->seq_id) {
            counters_.prefix_tokens_reused += s.n_past;
        } else if (keeps_kv(s)) {
            counters_.cached_prompt_tokens += s.n_past;
            ++(s.n_past > 0 ? counters_.prompt_cache_hits : counters_.prompt_cache_misses);
        }
        if (s.n_cached < 0) {
            s.n_cached = std::min(s.n_past, s.n_prompt);
        }
        if (s.prefix_user) {
            s.prefix_user = false;
            --prefix_->users;
        }
        if (waiting_.front().get() == no_prefix_head_) {
            no_prefix_head_ = nullptr;  // the address may be reused by a later sequence
        }
        streams_.occupy(s.seq_id, std::move(waiting_.front()));
        waiting_.pop_front();
        ++n_live_;
    }
}

// With one KV stream per sequence, llama.cpp puts sequences in one micro-batch only when
// their ids are consecutive: live ids {0, 2, 5} cost three passes over the weights per
// step instead of one (measured: 16 sequences ending at alternating times ran ~1.5x
// slower). Whatever admission left, live sequences move into the window of streams where
// gathering them costs least (gap_plan): each move copies a stream cell for cell (llama.cpp
// does it before the next decode), so outputs are unchanged. What a hole caches is first
// copied to a free stream out of the window when one holds less (nothing, or an older entry).
void Engine::close_gaps() {
    bool synced = false;
    for (int32_t round = 0; round <= n_seq_; ++round) {  // each round moves one sequence
        const GapPlan plan = gap_plan(0);
        if (plan.first < 0) {
            return;  // unified KV, nothing live, or nowhere to gather
        }
        const int32_t first = plan.first;
        const int32_t last  = plan.first + plan.n;
        llama_seq_id  to    = -1;  // the lowest hole in the window
        llama_seq_id  from  = -1;  // the live sequence farthest out of it
        for (int32_t id = first; id < last && to < 0; ++id) {
            to = streams_.seq(id) ? -1 : id;
        }
        for (int32_t id = 0; id < n_seq_; ++id) {
            if (streams_.seq(id) && (id < first || id >= last) &&
                (from < 0 || std::abs(id - first) > std::abs(from - first))) {
                from = id;
            }
        }
        if (to < 0 || from < 0) {
            return;  // the live ids are consecutive
        }
        if (!synced) {
            sync_streams();  // losses count what running sequences hold now: plan again
            synced = true;
            continue;
        }
        if (streams_.lost(to) > 0) {
            llama_seq_id keep = -1;
            auto         rank = [&](llama_seq_id id) { return std::make_pair(streams_.lost(id) > 0, streams_.last_used(id)); };
            for (int32_t id = 0; id < n_seq_; ++id) {  // a free stream out of the window
                if (id != from && (id < first || id >= last) && streams_.is_free(id) &&
                    (keep < 0 || rank(id) < rank(keep))) {
                    keep = id;
                }
            }
            if (keep >= 0 && (streams_.lost(keep) == 0 || streams_.last_used(keep) < streams_.last_used(to))) {
                if (streams_.lost(keep) > 0) {
                    spill(keep);
                    ++counters_.prompt_cache_evictions;
                }
                llama_memory_seq_rm(mem_, keep, -1, -1);
                copy_stream(to, keep);  // queued before the move's copy
                ++counters_.kv_copies;
                streams_.move_entry(to, keep);
            } else {
                spill(to);
                ++counters_.prompt_cache_evictions;
            }
        }
        streams_.drop(to);
        Sequence * s = streams_.seq(from);
        llama_memory_seq_rm(mem_, to, -1, -1);
        if (s->n_past > 0) {
            copy_stream(from, to);
        }
        llama_memory_seq_rm(mem_, from, -1, -1);
        s->seq_id = to;
        streams_.move_seq(from, to);
        ++counters_.sequence_moves;
    }
}

// The running sequences, oldest admission first: the order their prompt chunks are fed in.
std::vector<Sequence *> Engine::running_by_admission() const {
    std::vector<Sequence *> running;
    for (int32_t id = 0; id < n_seq_; ++id) {
        Sequence * s = streams_.seq(id);
        if (s && s->running()) {
            running.push_back(s);
        }
    }
    std::sort(running.begin(), running.end(),
              [](Sequence * a, Sequence * b) { return a->admitted_at < b->admitted_at; });
    return running;
}

// The entry of a sequence's one token to feed (its last sample, or a one-token prompt
// or continuation): logits always, since it is the last token fed.
Engine::Entry Engine::next_token_entry(Sequence * s) {
    const int32_t p = s->n_past;
    return {s, s->tokens[p], p, true, p < s->n_prompt || s->scorer != nullptr};
}

void Engine::build_batch(std::vector<Entry> & entries) {
    const std::vector<Sequence *> running = running_by_admission();

    // Every generating sequence gets its next token in; prompt chunks fill the rest, so a
    // long prompt never stalls the others for its whole prefill.
    for (Sequence * s : running) {
        if (s->to_feed() == 1) {
            entries.push_back(next_token_entry(s));
        }
    }
    if (prefix_ && !prefix_->decoded()) {
        // Before other prompt chunks: admissions wait for it. No logits: nothing samples it.
        const int32_t n = std::min(prefix_->to_feed(), n_batch_ - static_cast<int32_t>(entries.size()));
        for (int32_t k = 0; k < n; ++k) {
            const int32_t p = prefix_->n_past + k;
            entries.push_back({nullptr, prefix_->tokens[p], p, false, true});
        }
    }
    for (Sequence * s : running) {
        const int32_t room = n_batch_ - static_cast<int32_t>(entries.size());
        if (room <= 0) {
            break;
        }
        if (s->to_feed() <= 1) {
            continue;
        }
        const int32_t n = std::min(s->to_feed(), room);
        for (int32_t k = 0; k < n; ++k) {
            const int32_t p = s->n_past + k;
            entries.push_back({s, s->tokens[p], p, s->wants_logits(p), true});
        }
    }
    // With one KV stream per sequence, llama.cpp packs a micro-batch only from sequences
    // with consecutive ids, in batch order: ordered by id, the tokens of all running
    // sequences go through the model together instead of in several passes.
    const llama_seq_id prefix_id = prefix_ ? prefix_->seq_id : 0;
    std::stable_sort(entries.begin(), entries.end(), [prefix_id](const Entry & a, const Entry & b) {
        return (a.seq ? a.seq->seq_id : prefix_id) < (b.seq ? b.seq->seq_id : prefix_id);
    });
}

// Batch-invariant mode. llama.cpp's CPU kernels pick their path (and so their order of
// floating-point sums) by the shape of a call: how many rows, how many tokens per
// sequence. Measured on Gemma 3: the same prompt at any row of a batch, beside any
// companion, gives the same numbers as long as the shape is the same, and generation
// steps of at least ~9 one-token rows all agree. So: every prompt chunk (a prompt, or a
// scoring continuation) is decoded in a call of its own, in chunks of n_batch counted
// from position 0 (boundaries the prompt alone decides), and every generation step is
// one call of at least min_rows rows, padded with dummy rows in empty streams, every row
// with logits.
void Engine::step_invariant() {
    const std::vector<Sequence *> running = running_by_admission();
    // Prompts first, whole: after this every running sequence has one token to feed, so the
    // generation step's seq ids are consecutive (llama.cpp splits a step at a gap).
    std::vector<Entry> chunk;
    chunk.reserve(static_cast<size_t>(n_batch_));
    for (Sequence * s : running) {
        while (s->running() && s->to_feed() > 1) {
            chunk.clear();
            const int32_t n = std::min(s->to_feed(), n_batch_ - s->n_past % n_batch_);
            for (int32_t k = 0; k < n; ++k) {
                const int32_t p = s->n_past + k;
                chunk.push_back({s, s->tokens[p], p, s->wants_logits(p), true});
            }
            decode_entries(chunk);
        }
    }
    std::vector<Entry> rows;
    rows.reserve(static_cast<size_t>(n_batch_));
    build_padded_rows(rows);
    if (!rows.empty()) {
        decode_entries(rows);
    }
}

// One row per running sequence, in seq id order, and dummy rows in the free ids below
// max(min_rows, highest live id + 1): consecutive ids, at least min_rows rows.
void Engine::build_padded_rows(std::vector<Entry> & rows) {
    int32_t top = -1;
    for (int32_t id = 0; id < n_seq_; ++id) {
        const Sequence * s = streams_.seq(id);
        if (s && s->running()) {
            top = std::max(top, static_cast<int32_t>(s->seq_id));
        }
    }
    if (top < 0) {
        return;
    }
    top = std::max(top + 1, cfg_.min_rows);
    for (int32_t id = 0; id < top; ++id) {
        Sequence * s = streams_.seq(id);
        if (s && s->running()) {
            if (s->to_feed() != 1) {
                throw std::logic_error("batch-invariant step: a sequence with " + std::to_string(s->to_feed()) +
                                       " tokens to feed");
            }
            rows.push_back(next_token_entry(s));
        } else {
            // A free slot, a finished one (its KV already removed) or a padding stream. Its
            // logits are computed and dropped: llama.cpp runs the last layer and the output
            // head on the rows with logits only, so their count is part of the shape too.
            rows.push_back({nullptr, 0, 0, true, false, static_cast<llama_seq_id>(id)});
        }
    }
}

// Entries of a sequence that was paused or finished since the batch was built, or of a
// prefix given up, are skipped.
bool Engine::entry_running(const Entry & e) const {
    return e.seq ? e.seq->running() : e.padding >= 0 || prefix_ != nullptr;
}

// Decodes the step's entries, in views as large as the KV cache takes; what happens on a
// failure is Engine::recover's decision.
void Engine::decode_entries(std::vector<Entry> & entries) {
    size_t i    = 0;
    size_t view = entries.size();
    bool   split = false;
    std::vector<size_t> taken;
    taken.reserve(entries.size());
    std::vector<Draw> draws;

    while (i < entries.size()) {
        taken.clear();
        size_t j = i;
        while (j < entries.size() && taken.size() < view) {
            if (entry_running(entries[j])) {
                taken.push_back(j);
            }
            ++j;
        }
        if (taken.empty()) {
            i = j;
            continue;
        }

        // Checks llama.cpp would otherwise answer with an abort of the whole process.
        if (taken.size() > static_cast<size_t>(n_batch_)) {
            throw std::logic_error("batch larger than n_batch");
        }
        batch_.n_tokens = 0;
        int32_t n_prompt_tok = 0;
        for (size_t k : taken) {
            const Entry &      e      = entries[k];
            const llama_seq_id id     = e.seq ? e.seq->seq_id : e.padding >= 0 ? e.padding : prefix_->seq_id;
            const int32_t      n_past = e.seq ? e.seq->n_past : e.padding >= 0 ? 0 : prefix_->n_past;
            if (id < 0 || id >= n_seq_ || e.pos < n_past || e.pos >= n_ctx_seq()) {
                throw std::logic_error("batch entry out of range (seq " + std::to_string(id) + ", pos " +
                                       std::to_string(e.pos) + ")");
            }
            const int32_t b     = batch_.n_tokens++;
            batch_.token[b]     = e.token;
            batch_.pos[b]       = e.pos;
            batch_.n_seq_id[b]  = 1;
            batch_.seq_id[b][0] = id;
            batch_.logits[b]    = e.logits ? 1 : 0;
            n_prompt_tok += e.prompt ? 1 : 0;
        }

        if (abort_countdown_ > 0 && --abort_countdown_ == 0) {
            abort_now_.store(true);
        }
        bind_backend_samplers();
        const auto    t0  = Clock::now();
        const int32_t ret = llama_decode(ctx_, batch_);
        const double  dt  = seconds_since(t0);
        abort_now_.store(false);

        if (ret == 0) {
            streams_.copies_done();  // llama.cpp made the copies first
            ++counters_.decode_calls;
            counters_.fallback_decodes += split ? 1 : 0;
            const double share = static_cast<double>(n_prompt_tok) / batch_.n_tokens;
            counters_.prompt_seconds += dt * share;
            counters_.generation_seconds += dt * (1.0 - share);
            counters_.prompt_tokens += n_prompt_tok;
            draws.assign(taken.size(), Draw{});
            draw_tokens(entries, taken, draws);
            for (size_t b = 0; b < taken.size(); ++b) {
                on_decoded(entries[taken[b]], static_cast<int32_t>(b), &draws[b]);
            }
            i = j;
            continue;
        }
        split = true;
        switch (recover(ret, taken.size(), entries[taken[0]])) {
            case Recovery::Split:
                view = (taken.size() + 1) / 2;
                break;
            case Recovery::Retry:
                view = entries.size() - i;  // room was freed: try the rest whole again
                break;
            case Recovery::Fatal:
                throw std::runtime_error(decode_error_text(ret));
        }
    }
}

// A decoded token moves its sequence on: KV accounted, and where its logits were asked
// for, a sampled token (Generating or Done) or a scored one (Scoring or Done).
void Engine::on_decoded(const Entry & e, int32_t out_index, Draw * draw) {
    if (e.padding >= 0) {
        llama_memory_seq_rm(mem_, e.padding, -1, -1);  // the stream is empty again
        ++counters_.padding_rows;
        return;
    }
    if (!e.seq) {
        prefix_->n_past = e.pos + 1;
        return;
    }
    Sequence & s = *e.seq;
    s.n_past     = e.pos + 1;
    if (!e.logits) {
        return;
    }
    if (s.scorer) {
        score(&s, out_index, e.pos);
    } else {
        take_token(&s, *draw);
    }
}

// Whether an entry's logits are sampled: the last token fed of a generating sequence.
static bool samples(const Sequence * s, bool logits) { return s && logits && !s->scorer; }

// Draws the next token of every sequence sampled from this decode. Each sequence's sampler
// is its own and the logits are read-only once in output order, so the rows are spread over
// the decode's own threads (OpenMP's, which llama.cpp's CPU backend uses too: they are idle
// between two decodes). A sampler's exception is kept for take_token to raise in order.
void Engine::draw_tokens(const std::vector<Entry> & entries, const std::vector<size_t> & taken,
                         std::vector<Draw> & draws) {
    std::vector<int32_t> rows;
    for (size_t b = 0; b < taken.size(); ++b) {
        const Entry & e = entries[taken[b]];
        if (!samples(e.seq, e.logits)) {
            continue;
        }
        if (e.seq->sampler->backend_chain()) {
            // Sampled in the graph: only the token id to read (on this thread: the read
            // puts llama.cpp's outputs in order).
            Draw & d = draws[b];
            d.token  = e.seq->sampler->take_backend_token(ctx_, static_cast<int32_t>(b));
            if (d.token == LLAMA_TOKEN_NULL) {
                d.error = std::make_exception_ptr(std::runtime_error("backend sampling gave no token"));
            } else {
                ++counters_.backend_sampled_tokens;
            }
            continue;
        }
        rows.push_back(static_cast<int32_t>(b));
    }
    if (rows.empty()) {
        return;
    }
    llama_get_logits(ctx_);  // puts the outputs in batch order, once, on this thread
    const int32_t n = static_cast<int32_t>(rows.size());
    const bool verbose = cfg_.verbose;
    auto draw = [&](int32_t i, size_t scratch) {
        const int32_t b = rows[static_cast<size_t>(i)];
        Sequence *    s = entries[taken[static_cast<size_t>(b)]].seq;
        Draw &        d = draws[static_cast<size_t>(b)];
        try {
            const bool want_lp = s->item.params.logprobs >= 0;
            d.token = s->sampler->sample(ctx_, b, candidates_[scratch], want_lp ? &d.logprob : nullptr);
        } catch (...) {
            d.error = std::current_exception();
        }
    };
#ifdef _OPENMP
    // A row of work is a pass or two over the vocabulary: worth a thread from two rows on.
    const int32_t threads = std::min(n_threads_, n);
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            LogScope      scope(verbose);  // llama.cpp's messages from this thread are ours too
            const size_t  me = static_cast<size_t>(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
            for (int32_t i = 0; i < n; ++i) {
                draw(i, me);
            }
        }
        return;
    }
#endif
    (void) verbose;
    for (int32_t i = 0; i < n; ++i) {
        draw(i, 0);
    }
}

// Attaches each running sequence's backend sampler chain to its stream, and detaches what
// a stream no longer runs (finished, paused, moved), before a decode: llama.cpp applies the
// attached chains in the graph, and only a decode reads them (a freed chain is detached
// before the next one). Attaching changes the graph, so llama.cpp reserves it again: this
// happens at admissions and exits, not every step.
void Engine::bind_backend_samplers() {
    if (!cfg_.backend_sampling) {
        return;
    }
    for (int32_t id = 0; id < n_seq_; ++id) {
        Sequence *      in     = streams_.seq(id);
        Sequence *      s      = in && in->running() && in->sampler ? in : nullptr;
        llama_sampler * chain  = s ? s->sampler->backend_chain() : nullptr;
        const uint64_t  serial = chain ? s->sampler->serial() : 0;
        if (streams_.backend_bound(id) == serial) {
            continue;
        }
        if (streams_.backend_bound(id) != 0) {
            llama_set_sampler(ctx_, id, nullptr);
            streams_.set_backend_bound(id, 0);
        }
        if (chain) {
            if (llama_set_sampler(ctx_, id, s->sampler->chain_to_attach())) {
                streams_.set_backend_bound(id, serial);
            } else {
                s->sampler->drop_backend();  // this backend lacks an op: the host samples it
                take_log_errors();
            }
        }
    }
}

// The failure policy, in one place. llama_decode returned `code` for a view of n_tokens
// entries starting with `first`:
//  - anything but 1 is fatal: step() drops every running sequence, reported as aborted.
//  - 1 (no KV room): first drop the least recently used prompt cache entry and retry the
//    same tokens (cached KV never costs running work room), one entry per retry;
//  - 1 with no cache entry left, for several tokens: retry them in views half the size.
//  - 1 for a single token: free room, in this order, and retry:
//    1. give up the shared prefix, if one is kept or being decoded: queued work yields to
//       running work (its users prefill alone later; no new prefix is chosen until a
//       sequence leaves its slot);
//    2. pause the youngest running sequence (its KV dropped, queued first, recomputed
//       when room returns), which may be the blocked one itself;
//    3. the blocked sequence runs alone and still does not fit: it finishes with "error".
// Only a shared pool (kv_unified with kv_size < n_ctx * n_parallel) runs out of room: a
// KV stream per sequence holds n_ctx tokens, and submit() refuses longer prompts.
Engine::Recovery Engine::recover(int32_t code, size_t n_tokens, const Entry & first) {
    if (code != 1) {
        return Recovery::Fatal;
    }
    ++counters_.decode_retries;
    if (evict_one(-1, -1)) {
        return Recovery::Retry;
    }
    if (n_tokens > 1) {
        return Recovery::Split;
    }
    if (prefix_) {
        drop_prefix(/*keep=*/false);
        prefix_backoff_ = true;
        return Recovery::Retry;
    }
    Sequence * youngest  = nullptr;
    int32_t    n_running = 0;
    for (int32_t id = 0; id < n_seq_; ++id) {
        Sequence * s = streams_.seq(id);
        if (s && s->running()) {
            ++n_running;
            if (!youngest || s->admitted_at > youngest->admitted_at) {
                youngest = s;
            }
        }
    }
    if (n_running > 1) {
        pause(youngest);
        return Recovery::Retry;
    }
    Sequence * blocked = first.seq;  // not the prefix: that was given up above
    finish(blocked, Finish::Error,
           {ErrorCode::NoKvRoom, "no KV cache room for this sequence even alone (" + std::to_string(blocked->tokens.size()) +
               " tokens; KV pool " + std::to_string(kv_capacity()) + " cells)"});
    return Recovery::Retry;
}

void Engine::pause(Sequence * s) {
    const llama_seq_id id = s->seq_id;
    llama_memory_seq_rm(mem_, id, -1, -1);
    s->state  = SeqState::Paused;
    s->seq_id = -1;
    s->n_past = 0;  // its tokens (prompt + generated so far) are recomputed on readmission
    if (s->scorer && static_cast<int32_t>(s->tokens.size()) > s->n_prompt) {
        // Fed as before the pause: the prompt, then (a step later) the continuation. In one
        // decode together llama.cpp would round differently (chunk-size dependent kernels).
        s->tokens.resize(static_cast<size_t>(s->n_prompt));
        s->scorer->rewind();
    }
    ++counters_.preemptions;
    --n_live_;
    waiting_.push_front(streams_.release(id));
}

// The drawn token joins its sequence: stop tokens, stop strings and lengths end it.
void Engine::take_token(Sequence * s, Draw & d) {
    if (d.error) {
        std::rethrow_exception(d.error);  // as if sampled here: step() fails the batch
    }
    const llama_token tok = d.token;
    if (s->item.params.logprobs >= 0) {
        s->logprobs.push_back(std::move(d.logprob));
    }
    s->tokens.push_back(tok);
    s->state = SeqState::Generating;
    ++s->n_generated;
    ++counters_.generated_tokens;
    const SamplingConfig & p = s->item.params;

    if (!p.ignore_eos && model_->is_eog(tok)) {
        s->stop_token = tok;
        finish(s, Finish::Stop);
        return;
    }
    if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), tok) != p.stop_token_ids.end()) {
        s->stop_token = tok;
        finish(s, Finish::Stop);
        return;
    }
    if (s->text.append(model_->piece(tok))) {
        finish(s, Finish::Stop);
        return;
    }
    if (s->n_generated >= p.max_tokens || static_cast<int32_t>(s->tokens.size()) >= cfg_.n_ctx) {
        finish(s, Finish::Length);
    }
}

void Engine::score(Sequence * s, int32_t idx, llama_pos pos) {
    const float * logits = llama_get_logits_ith(ctx_, idx);
    if (!logits) {
        throw std::runtime_error("no logits for output " + std::to_string(idx));
    }
    ContinuationScorer & sc = *s->scorer;
    if (pos + 1 == s->n_prompt) {
        sc.read_first(logits, model_->n_vocab());
        next_continuation(s);
        return;
    }
    sc.read_next(logits, model_->n_vocab(), pos - s->n_prompt);
    if (pos + 1 < static_cast<int32_t>(s->tokens.size())) {
        return;
    }
    // This continuation is scored: roll the KV back to the prompt's end for the next one.
    // Unsafe where cells may have been reused meanwhile (a sliding window shorter than
    // prompt + continuation) or where llama.cpp cannot cut a sequence (recurrent models):
    // there the prompt is decoded again, and its last logits queue the next continuation.
    s->tokens.resize(static_cast<size_t>(s->n_prompt));
    const int32_t n_swa  = llama_model_n_swa(model_->get());
    const bool    in_swa = n_swa <= 0 || s->n_prompt + sc.max_len() <= n_swa;
    if (in_swa && llama_memory_seq_rm(mem_, s->seq_id, s->n_prompt, -1)) {
        s->n_past = s->n_prompt;
        next_continuation(s);
    } else {
        llama_memory_seq_rm(mem_, s->seq_id, -1, -1);
        s->n_past = 0;
        s->state  = SeqState::Prefilling;
    }
}

void Engine::next_continuation(Sequence * s) {
    if (!s->scorer->advance()) {
        finish(s, Finish::Stop);
        return;
    }
    const std::vector<llama_token> feed = s->scorer->to_feed();
    s->tokens.insert(s->tokens.end(), feed.begin(), feed.end());
    s->state = SeqState::Scoring;
}

// Its KV becomes a prompt cache entry, or goes at once, not at the step's end: a retry later
// in this step may need the room (and may evict the entry for it).
void Engine::finish(Sequence * s, Finish why, Failure failure) {
    if (s->running()) {
        if (why != Finish::Error && keeps_kv(*s)) {
            keep_cached(s->seq_id, s->tokens.data(), s->n_past);
        } else {
            llama_memory_seq_rm(mem_, s->seq_id, -1, -1);
        }
    }
    s->state  = SeqState::Done;
    s->finish = why;
    if (failure) {
        s->failure = std::move(failure);
    }
}

Result Engine::to_result(Sequence & s) const {
    Result r;
    r.request  = s.item.request;
    r.index    = s.item.index;
    r.sample   = s.item.sample;
    r.n_prompt = s.n_prompt;
    r.tokens.assign(s.tokens.begin() + std::min<size_t>(s.tokens.size(), static_cast<size_t>(s.n_prompt)), s.tokens.end());
    r.text       = s.text.final_bytes();
    r.finish     = s.finish;
    r.stop_token = s.stop_token;
    r.error_code = s.failure.code;
    r.error      = s.failure.message;
    r.n_cached   = std::max(0, s.n_cached);
    r.logprobs   = s.logprobs;
    if (s.scorer && s.finish != Finish::Error) {
        r.tokens = s.scorer->tokens();
        r.logprobs.clear();
        for (float lp : s.scorer->logprobs()) {
            r.logprobs.push_back(TokenLogprob{lp, {}});
        }
    }
    if (s.text.matched_stop() >= 0) {
        r.stop_string = s.item.params.stop[static_cast<size_t>(s.text.matched_stop())];
    }
    return r;
}

// A finished sequence's KV was dealt with by finish(); a running one's (cancelled) is kept
// in the prompt cache when `keep` allows, or removed.
void Engine::free_slot(llama_seq_id id, bool keep) {
    const Sequence * s = streams_.seq(id);
    if (s->running()) {
        if (keep && keeps_kv(*s)) {
            keep_cached(id, s->tokens.data(), s->n_past);
        } else {
            llama_memory_seq_rm(mem_, id, -1, -1);
        }
    }
    streams_.release(id);
    --n_live_;
    prefix_backoff_ = false;  // room returned: a prefix may be worth decoding again
}

void Engine::collect_finished(std::vector<Result> & out) {
    for (int32_t id = 0; id < n_seq_; ++id) {
        Sequence * s = streams_.seq(id);
        if (s && s->state == SeqState::Done) {
            out.push_back(to_result(*s));
            free_slot(id, /*keep=*/true);
        }
    }
}

void Engine::collect_deltas(std::vector<StreamDelta> & out) {
    for (int32_t id = 0; id < n_seq_; ++id) {
        Sequence * slot = streams_.seq(id);
        if (!slot || !slot->item.stream || slot->state == SeqState::Done || slot->scorer) {
            continue;
        }
        Sequence &   s         = *slot;
        const size_t generated = s.tokens.size() - static_cast<size_t>(s.n_prompt);
        const size_t stable    = s.text.stable_len();
        const size_t fresh     = generated - s.tokens_streamed;
        // Fewer, larger deltas cut the per-token work of whoever reads them (an HTTP
        // stream's event loop); the first token still goes at once (time to first token).
        const bool held = fresh > 0 && s.tokens_streamed > 0 &&
                          fresh < static_cast<size_t>(std::max<int32_t>(1, s.item.stream_interval));
        if ((fresh == 0 && stable <= s.bytes_streamed) || held) {
            continue;
        }
        StreamDelta d;
        d.request = s.item.request;
        d.index   = s.item.index;
        d.sample  = s.item.sample;
        d.tokens.assign(s.tokens.begin() + s.n_prompt + static_cast<std::ptrdiff_t>(s.tokens_streamed), s.tokens.end());
        if (!s.logprobs.empty()) {
            d.logprobs.assign(s.logprobs.begin() + static_cast<std::ptrdiff_t>(s.tokens_streamed), s.logprobs.end());
        }
        if (stable > s.bytes_streamed) {
            d.text.assign(s.text.bytes(), s.bytes_streamed, stable - s.bytes_streamed);
            s.bytes_streamed = stable;
        }
        s.tokens_streamed = generated;
        out.push_back(std::move(d));
    }
}

size_t Engine::cancel_request(uint64_t request) {
    size_t dropped = 0;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->item.request == request) {
            if ((*it)->prefix_user) {
                --prefix_->users;
            }
            if (it->get() == no_prefix_head_) {
                no_prefix_head_ = nullptr;
            }
            it = waiting_.erase(it);
            ++dropped;
        } else {
            ++it;
        }
    }
    for (int32_t id = 0; id < n_seq_; ++id) {
        const Sequence * s = streams_.seq(id);
        if (s && s->item.request == request) {
            free_slot(id, /*keep=*/true);  // what it decoded stays valid KV
            ++dropped;
        }
    }
    const size_t before = ready_.size();
    ready_.erase(std::remove_if(ready_.begin(), ready_.end(), [&](const Result & r) { return r.request == request; }),
                 ready_.end());
    dropped += before - ready_.size();
    if (prefix_ && prefix_->users <= 0) {
        drop_prefix(/*keep=*/true);
    }
    return dropped;
}

// Every live sequence ends with `why`, and the prompt cache goes too: after a failed decode
// nothing llama.cpp holds is trusted.
void Engine::drop_live(const Failure & why, std::vector<Result> & out) {
    drop_prefix(/*keep=*/false);
    for (int32_t id = 0; id < n_seq_; ++id) {
        if (Sequence * s = streams_.seq(id)) {
            if (s->state != SeqState::Done) {
                finish(s, Finish::Error, why);
            }
            out.push_back(to_result(*s));
            free_slot(id, /*keep=*/false);
        }
    }
    clear_cache();
}

namespace {

// Adds the time of a step() spent outside llama_decode to counters.host_seconds.
class HostTimer {
public:
    explicit HostTimer(Counters & c) : c_(c), t0_(Clock::now()), decode0_(decode_seconds()) {}
    ~HostTimer() { c_.host_seconds += std::max(0.0, seconds_since(t0_) - (decode_seconds() - decode0_)); }
    HostTimer(const HostTimer &) = delete;
    HostTimer & operator=(const HostTimer &) = delete;

private:
    double decode_seconds() const { return c_.prompt_seconds + c_.generation_seconds; }
    Counters &        c_;
    Clock::time_point t0_;
    double            decode0_;
};

}  // namespace

StepOutput Engine::step() {
    LogScope   scope(cfg_.verbose);
    HostTimer  timer(counters_);
    StepOutput out;
    out.finished.swap(ready_);
    admit();
    close_gaps();
    const bool prefix_pending = prefix_ && !prefix_->decoded();
    if (n_live_ == 0 && !prefix_pending) {
        return out;
    }
    try {
        if (batch_invariant()) {
            step_invariant();
        } else {
            std::vector<Entry> entries;
            entries.reserve(static_cast<size_t>(n_batch_));
            build_batch(entries);
            decode_entries(entries);
        }
    } catch (const std::exception & e) {
        // Whatever llama.cpp kept of a failed call is unusable: clear every live sequence.
        out.fatal = e.what();
        std::string why = take_log_errors();
        if (!why.empty()) {
            out.fatal += ": " + why;
        }
        drop_live({ErrorCode::Aborted, out.fatal}, out.finished);
        return out;
    }
    collect_deltas(out.deltas);
    collect_finished(out.finished);
    return out;
}

void Engine::cancel_all() {
    std::vector<Result> dropped;
    drop_live({ErrorCode::Aborted, "cancelled"}, dropped);
    waiting_.clear();
    no_prefix_head_ = nullptr;
    ready_.clear();
}

}  // namespace pg
