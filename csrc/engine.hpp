// The batch engine: slots, admission, one llama_batch per step, decode with the
// failure policy, sampling and finishing. Python drives it one step() at a time.
//
// A sequence's states are drawn in sequence.hpp. A prompt shared by several waiting
// sequences is a SharedPrefix: decoded once into a KV stream of its own and copied into
// each user's KV on admission.
// KV that outlives a request (the prompt cache): a finished sequence's stream keeps its
// tokens' KV as a cache entry; a new prompt starts from the longest cached prefix of its
// token ids (in place, or copied from another stream) and decodes only the rest.
// With a host tier (cache_ram > 0, kv_host.hpp) an entry about to be overwritten is saved to
// host memory first, and a prompt whose longest cached prefix lives there is restored.
// What happens when llama_decode fails is decided in one function, Engine::recover.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "kv_host.hpp"
#include "llama.h"
#include "model.hpp"
#include "placement.hpp"
#include "request.hpp"
#include "sequence.hpp"
#include "streams.hpp"

namespace pg {

struct EngineConfig {
    int32_t n_parallel = 8;     // slots: sequences live at once, seq_ids [0, n_parallel)
    int32_t n_ctx      = 4096;  // tokens per sequence, prompt + output
    int32_t n_batch    = 512;   // tokens per llama_decode
    int32_t n_threads  = 0;     // 0: all hardware threads
    bool    kv_unified = false; // one KV buffer shared by all sequences
    int32_t flash_attn = -1;    // -1 auto, 0 off, 1 on
    int32_t type_k     = 1;     // ggml_type of the K cache (1 = f16)
    int32_t type_v     = 1;
    int32_t kv_size    = 0;     // kv_unified only: cells in the shared pool; 0 = n_ctx * n_parallel
    int32_t min_prefix = 16;    // shortest common prompt prefix worth decoding once and copying;
                                // INT32_MAX: never share
    bool    prompt_cache = true; // keep finished sequences' KV for later prompts (requests opt
                                 // out with SamplingConfig::cache_prompt)
    int64_t cache_ram  = 0;      // bytes of host memory for the prompt cache's host tier; 0: none
    // > 0: batch-invariant mode. Each prompt chunk is decoded in a call of its own, and
    // every generation step is padded with one-token dummy rows up to this many rows, so a
    // sequence's numbers never depend on what else runs (see Engine::step_invariant).
    int32_t min_rows   = 0;
    // Sequences whose sampler chain has a backend form sample in llama.cpp's graph (its
    // backend sampling API): only token ids come back, no logits to read for them.
    bool    backend_sampling = false;
    bool    verbose    = false;
};

struct Counters {
    int64_t decode_calls      = 0;  // llama_decode calls that succeeded
    int64_t decode_retries    = 0;  // calls that returned 1 (no KV room) and were retried smaller
    int64_t fallback_decodes  = 0;  // successful calls made on a split batch after a retry
    int64_t preemptions       = 0;  // live sequences paused to free KV room
    int64_t sequence_moves    = 0;  // live sequences moved down to close a gap in the seq ids
    int64_t padding_rows      = 0;  // dummy rows decoded to keep a step's shape (batch-invariant mode)
    int64_t prompt_tokens     = 0;  // prompt (and recomputed) tokens decoded
    int64_t prefix_tokens_reused = 0; // prompt tokens not decoded: copied from a shared prefix
    int64_t cached_prompt_tokens = 0; // prompt tokens not decoded: reused from the prompt cache
    int64_t prompt_cache_hits    = 0; // lookups (a sequence's admission or a shared prefix's
                                      // start; cache on, opted in) that reused cached KV
    int64_t prompt_cache_misses  = 0; // lookups that found none to reuse
    int64_t prompt_cache_evictions = 0; // cache entries whose tokens no other stream holds,
                                        // dropped (for room, overwritten) or reused in place
                                        // for fewer tokens than that loses
    int64_t kv_copies         = 0;  // KV copies between streams to reuse or keep cached KV
    // The host tier (a subset of the prompt cache's hits and tokens above).
    int64_t host_cache_hits      = 0;  // lookups that restored KV from host memory
    int64_t host_cached_tokens   = 0;  // prompt tokens not decoded: restored from host memory
    int64_t host_cache_saves     = 0;  // stream entries saved to host memory before being dropped
    int64_t host_saved_tokens    = 0;  // tokens those saves hold
    int64_t host_cache_evictions = 0;  // host entries dropped for room (least recently used)
    int64_t host_restore_failures = 0; // restores llama.cpp refused (the prompt was decoded instead)
    double  host_save_seconds    = 0;  // time spent saving and restoring KV state
    double  host_restore_seconds = 0;
    int64_t generated_tokens  = 0;  // tokens sampled
    int64_t backend_sampled_tokens = 0;  // of which sampled in the graph (backend sampling)
    double  prompt_seconds    = 0;  // decode time, split by token share between prompt...
    double  generation_seconds = 0; // ...and generation tokens of each call
    double  host_seconds      = 0;  // step() time outside llama_decode: admission, sampling,
                                    // stops, results (what a fast backend waits for)
};

// KV streams (seq ids) an engine with this configuration asks llama.cpp for: one per slot,
// plus one for a shared prefix and the prompt cache while llama.cpp's sequence limit leaves
// room for it; in batch-invariant mode at least min_rows (padding rows take empty streams).
int32_t kv_streams(const EngineConfig & cfg);

// New output of a streaming sequence since its previous delta.
struct StreamDelta {
    uint64_t                 request = 0;
    int64_t                  index   = 0;
    int32_t                  sample  = 0;
    std::vector<llama_token> tokens;
    std::string              text;   // complete characters, never part of a possible stop string
    std::vector<TokenLogprob> logprobs;  // one per token of `tokens`, if params.logprobs >= 0
};

struct StepOutput {
    std::vector<StreamDelta> deltas;  // sequences still running; a finished one's last words are its Result
    std::vector<Result> finished;
    std::string         fatal;  // non-empty: llama_decode failed fatally; live sequences were dropped (Aborted)
};

class Engine {
public:
    // Throws std::runtime_error (with llama.cpp's reason) if the context cannot be created.
    Engine(std::shared_ptr<ModelHandle> model, const EngineConfig & cfg);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    // Why `item` cannot run on this engine (empty, too long for n_ctx, a token outside the
    // vocabulary, continuations that do not fit); a Failure without a code when it can.
    // Reads only the configuration and the model: callers may ask from any thread.
    Failure check(const Item & item) const;
    // Queues a request. One that cannot run (check(), or a sampler llama.cpp cannot build)
    // becomes an error result handed out by the next step().
    void submit(Item item);

    // One batch step: admit waiting sequences, decode one batch, sample, finish.
    StepOutput step();

    bool has_work() const { return !waiting_.empty() || n_live_ > 0 || !ready_.empty(); }
    // Drops every queued and live sequence and removes their KV; the engine stays usable.
    void cancel_all();
    // Drops the sequences of one request (queued, live, or finished but not handed out).
    // Returns how many were dropped.
    size_t cancel_request(uint64_t request);

    Counters counters() const { return counters_; }
    void     reset_counters() { counters_ = Counters{}; }
    int32_t  n_live() const { return n_live_; }
    // KV positions llama.cpp holds beyond the prompt cache's entries (0 when nothing is
    // running): leak checks.
    int64_t  kv_tokens() const;
    // Tokens whose KV the prompt cache keeps for later prompts (KV streams only).
    int64_t  cached_tokens() const;
    // The host tier: bytes held (state and tokens), its budget, entries, tokens held.
    int64_t  host_bytes() const { return host_ ? static_cast<int64_t>(host_->bytes()) : 0; }
    int64_t  host_budget() const { return host_ ? static_cast<int64_t>(host_->budget()) : 0; }
    int64_t  host_entries() const { return host_ ? static_cast<int64_t>(host_->size()) : 0; }
    int64_t  host_tokens() const;
    // The host tier's entries as bytes tagged with this engine's KV configuration, least
    // recently used first, and back: an entry of another configuration (model, KV types,
    // layout) is refused (false), as is one the budget cannot take. Moves a tier between
    // engines (a Model reopened, or a disk tier).
    std::vector<std::string> export_host() const;
    bool                     import_host(const std::string & bytes);
    const std::string &      kv_fingerprint() const { return fingerprint_; }
    int32_t  n_streams() const { return n_seq_; }  // seq ids: slots, plus one for prefixes and the cache
    size_t   n_waiting() const { return waiting_.size(); }
    int32_t  n_ctx() const { return cfg_.n_ctx; }
    int32_t  n_ctx_seq() const;     // KV positions one sequence can hold in llama.cpp
    int32_t  kv_capacity() const;   // total KV cells
    int32_t  n_batch() const { return n_batch_; }
    int32_t  n_parallel() const { return cfg_.n_parallel; }
    bool     flash_attn() const;
    bool     batch_invariant() const { return cfg_.min_rows > 0; }
    const ModelHandle & model() const { return *model_; }

    // Engines alive in this process (contexts not freed yet): leak checks in tests.
    static int32_t alive() { return alive_.load(); }

    // Test hook: make the n-th llama_decode from now abort through llama.cpp's own abort
    // callback (it then returns 2), to exercise the fatal-failure path for real.
    void abort_after_decodes(int32_t n) { abort_countdown_ = n; }
    // Test hook: empty when the stream table agrees with itself (index, losses, listings)
    // and with the engine (each sequence in the stream of its seq id, the live count, the
    // prefix's stream, the tokens KV is reused by); else what disagrees. Between steps.
    std::string check_streams();

private:
    struct SharedPrefix;
    struct Entry;
    using Placement = PlaceOption;
    struct GapPlan {
        int64_t cost  = 0;
        int32_t first = -1;  // the live sequences gather in streams [first, first + n)
        int32_t n     = 0;
    };
    struct HostHit {
        int64_t id = -1;  // host entry; -1: none
        int32_t n  = 0;   // leading tokens it restores
    };
    enum class Recovery { Split, Retry, Fatal };

    // admission and the shared prefix
    void choose_prefix();
    bool uses_prefix(const Sequence & s) const;
    void drop_prefix(bool keep);
    void admit();
    void admit_round();
    void close_gaps();
    // the prompt cache: where a prompt (or a prefix) starts, and what each stream holds
    Held         held(llama_seq_id id) const;
    int32_t      reusable(llama_seq_id id, const std::vector<llama_token> & t, int32_t cap) const;
    int32_t      loss(llama_seq_id id, int32_t keep) const;
    void         sync_streams();
    StreamMatch  best_source(const std::vector<llama_token> & t, int32_t cap, int32_t floor) const;
    GapPlan      gap_plan(int32_t grow) const;
    Placement    place(const std::vector<llama_token> & t, int32_t cap, bool reuse, llama_seq_id prefix_src,
                       bool live) const;
    int32_t      fill(const Placement & p);
    void         keep_cached(llama_seq_id id, const llama_token * data, int32_t n);
    bool         evict_one(llama_seq_id spare_a, llama_seq_id spare_b);
    void         clear_cache();
    // the host tier
    HostHit      host_lookup(const std::vector<llama_token> & t, int32_t cap) const;
    void         spill(llama_seq_id id);
    int32_t      restore(llama_seq_id id, const HostHit & hit);
    void         copy_stream(llama_seq_id src, llama_seq_id dst);
    bool         keeps_kv(const Sequence & s) const;
    // one step's batch
    std::vector<Sequence *> running_by_admission() const;
    static Entry next_token_entry(Sequence * s);
    void build_batch(std::vector<Entry> & entries);
    void step_invariant();
    void build_padded_rows(std::vector<Entry> & entries);
    void decode_entries(std::vector<Entry> & entries);
    bool entry_running(const Entry & e) const;
    struct Draw;
    void draw_tokens(const std::vector<Entry> & entries, const std::vector<size_t> & taken,
                     std::vector<Draw> & draws);
    void on_decoded(const Entry & e, int32_t out_index, Draw * draw);
    Recovery recover(int32_t code, size_t n_tokens, const Entry & first);
    void pause(Sequence * s);
    // outputs of a sequence
    void take_token(Sequence * s, Draw & d);
    void bind_backend_samplers();
    void score(Sequence * s, int32_t idx, llama_pos pos);
    void next_continuation(Sequence * s);
    void finish(Sequence * s, Finish why, Failure failure = {});
    void free_slot(llama_seq_id id, bool keep);  // its sequence leaves; its KV cached or removed
    void collect_finished(std::vector<Result> & out);
    void collect_deltas(std::vector<StreamDelta> & out);
    void drop_live(const Failure & why, std::vector<Result> & out);
    Result to_result(Sequence & s) const;
    int64_t kv_used_estimate() const;
    bool    sharing_prefixes() const { return cfg_.min_prefix < INT32_MAX; }
    bool    caching() const { return cfg_.prompt_cache; }

    static bool abort_cb(void * data);

    std::shared_ptr<ModelHandle> model_;
    EngineConfig                 cfg_;
    llama_context *              ctx_ = nullptr;
    llama_memory_t               mem_ = nullptr;
    llama_batch                  batch_{};
    std::vector<std::vector<llama_token_data>> candidates_;  // sampling scratch, one per thread
    int32_t                      n_threads_ = 1;
    int32_t                      n_batch_ = 0;

    int32_t                                n_seq_ = 0;  // KV streams (seq ids): slots, prefix/cache, padding
    int32_t                                n_swa_ = 0;  // the model's sliding window (0: none)
    // Per KV stream (index == seq_id, n_seq_ of them): the sequence in it (at most n_parallel
    // hold one), the prompt cache entry it keeps, its last use, queued copies; and the index
    // admission places prompts by.
    StreamTable                            streams_;
    std::unique_ptr<HostCache>             host_;         // the host tier; null: off
    std::string                            fingerprint_;  // what KV state from this context belongs to
    std::unique_ptr<SharedPrefix>          prefix_;  // at most one at a time
    // A prefix was given up for KV room: none is chosen again until a sequence leaves its
    // slot, or the same prefix would be decoded and given up every step.
    bool                                   prefix_backoff_ = false;
    const Sequence *                       no_prefix_head_ = nullptr;  // queue head known to share nothing
    std::deque<std::unique_ptr<Sequence>>  waiting_;
    std::vector<Result>                    ready_;   // results waiting for the next step()
    int32_t                                n_live_ = 0;
    uint64_t                               admit_clock_ = 0;
    Counters                               counters_;

    static std::atomic<int32_t> alive_;
    int32_t           abort_countdown_ = 0;
    std::atomic<bool> abort_now_{false};
};

}  // namespace pg
