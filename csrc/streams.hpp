// The engine's KV stream table: one record per KV stream (llama.cpp seq id) that owns
// everything the engine knows about it: the sequence running in it (if any), whether it
// holds the shared prefix, the prompt cache entry it keeps when no sequence runs in it,
// when that entry was last used, whether a queued cross-stream copy reads or writes it, and
// the backend sampler chain attached to it.
//
// Admission asks three questions of it, each answered from an index instead of a scan:
//  - which stream holds the longest prefix of a prompt (any stream: a copy source; or a
//    free one: reuse in place);
//  - how many of a free stream's cached tokens no other stream holds (what overwriting
//    it loses);
//  - which free stream to overwrite (one that loses nothing, else the least recently used).
// The index is every stream's held tokens in lexicographic order: the longest common prefix
// of a query with any of them is found next to where the query sorts (O(L log n) token
// comparisons), and a stream's tokens are held elsewhere as far as they are shared with a
// neighbour in that order. Losses are kept up to date as entries come and go.
//
// A running sequence's held tokens grow as it decodes, outside the table: sync() takes the
// new ones into the index (once per admission pass, not per admitted sequence). Index
// answers are hints the engine checks against the real held tokens before using KV.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <iterator>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "sequence.hpp"

namespace pg {

using StreamToken = int32_t;  // llama_token

struct StreamMatch {
    int32_t id = -1;  // the stream; -1: none
    int32_t n  = 0;   // leading tokens of the query it holds
};

// A span of tokens: what a stream holds KV for, at positions [0, n).
struct Held {
    const StreamToken * data = nullptr;
    int32_t             n    = 0;
};

class StreamTable {
public:
    explicit StreamTable(int32_t n_streams = 0);
    StreamTable(const StreamTable &)             = delete;  // the index's order refers to this table
    StreamTable & operator=(const StreamTable &) = delete;
    void resize(int32_t n_streams);  // an empty table only

    int32_t size() const { return static_cast<int32_t>(streams_.size()); }

    // -- who holds a stream ------------------------------------------------------------
    Sequence * seq(int32_t id) const { return at(id).seq.get(); }
    // A free stream takes `s` (its entry, if any, must have been dropped: fill()).
    void occupy(int32_t id, std::unique_ptr<Sequence> s);
    // The stream's sequence leaves it; the stream is free (it keeps whatever entry it has).
    std::unique_ptr<Sequence> release(int32_t id);
    // The sequence in `from` moves to free stream `to` (whose entry was dropped).
    void move_seq(int32_t from, int32_t to);
    // The shared prefix holds stream `id` (its tokens live in the engine, stable until
    // clear_prefix); `n` of them decoded so far. One at a time.
    void set_prefix(int32_t id, const StreamToken * tokens, int32_t n);
    void clear_prefix();
    int32_t prefix() const { return prefix_; }
    // No sequence in it and not the shared prefix's: admission may take it.
    bool is_free(int32_t id) const { return !at(id).seq && id != prefix_; }

    // -- the prompt cache entry -----------------------------------------------------------
    const std::vector<StreamToken> & entry(int32_t id) const { return at(id).entry; }
    void     keep(int32_t id, const StreamToken * t, int32_t n);  // the entry is t[0, n), just used
    void     drop(int32_t id);                                    // no entry
    void     move_entry(int32_t from, int32_t to);                // `to` takes `from`'s entry and use
    void     touch(int32_t id);
    uint64_t last_used(int32_t id) const { return at(id).used; }
    int64_t  cached_tokens() const { return cached_tokens_; }
    // The least recently used entry, not in `spare_a`/`spare_b` nor the prefix's stream; -1: none.
    int32_t oldest_entry(int32_t spare_a, int32_t spare_b) const;

    // -- what llama.cpp holds for a stream beside its KV -----------------------------------
    // A cross-stream copy is queued for it (source or destination): llama.cpp copies the
    // buffers at the next decode, so until then its state is neither saved nor overwritten
    // by a restore.
    bool copy_pending(int32_t id) const { return at(id).copy_pending; }
    void mark_copy(int32_t id) { at(id).copy_pending = true; }
    void copies_done();
    // The serial of the Sampler whose chain is attached to it (backend sampling); 0: none.
    uint64_t backend_bound(int32_t id) const { return at(id).backend_bound; }
    void     set_backend_bound(int32_t id, uint64_t serial) { at(id).backend_bound = serial; }

    // -- the index ------------------------------------------------------------------------
    // What stream `id` holds KV for: a running sequence's decoded tokens, the prefix's
    // decoded tokens, else its entry.
    Held held(int32_t id) const;
    // Takes running sequences' and the prefix's new tokens into the index.
    void sync();
    void prefix_decoded(int32_t n);
    // The stream holding the longest prefix of t[0, min(n, cap)) among those `ok(id, k)`
    // accepts (k: the tokens it holds as indexed), visited longest first (of the two nearest
    // on either side in the index, the longer, then the lower id); at most max_visits
    // visited. `free_only`: free streams with an entry only.
    template <class Ok>
    StreamMatch longest(const StreamToken * t, int32_t n, int32_t cap, bool free_only, Ok ok,
                        int32_t max_visits = INT32_MAX) const;
    // A free stream's cached tokens no other stream holds (0 for streams not free).
    int32_t lost(int32_t id) const { return at(id).lost; }
    // The free stream to overwrite (never `avoid`): one that loses nothing, the lowest id in
    // [lo, hi) first, else the lowest (`low`) or highest id; else the least recently used.
    int32_t victim(int32_t avoid, int32_t lo, int32_t hi, bool low) const;

    // Empty when the table is consistent (indexes, sets, losses against a recount);
    // else what is wrong. Tests.
    std::string check() const;

private:
    struct Stream {
        std::unique_ptr<Sequence> seq;
        std::vector<StreamToken>  entry;
        uint64_t                  used = 0;
        bool                      copy_pending = false;
        uint64_t                  backend_bound = 0;
        std::vector<StreamToken>  snap;  // held tokens as indexed (keys must not change in a set)
        int32_t                   lost = 0;
        // where the stream is listed, to unlist it
        bool in_entries = false, in_lossy = false, in_clean = false, in_free_index = false;
        uint64_t listed_used = 0;
    };
    struct Query {
        const StreamToken * data;
        int32_t             n;
    };
    struct Less {
        using is_transparent = void;
        const StreamTable * t;
        bool operator()(int32_t a, int32_t b) const;
        bool operator()(const Query & q, int32_t b) const;
        bool operator()(int32_t a, const Query & q) const;
    };
    using Index = std::set<int32_t, Less>;

    const Stream & at(int32_t id) const { return streams_.at(static_cast<size_t>(id)); }
    Stream &       at(int32_t id) { return streams_.at(static_cast<size_t>(id)); }
    void    refresh(int32_t id);  // re-index stream id's held tokens and its listing
    void    unlist(int32_t id);
    void    list(int32_t id);
    void    relist(int32_t id) { unlist(id); list(id); }
    void    recount_lost(int32_t id);
    int32_t count_lost(int32_t id) const;
    static int32_t lcp(const StreamToken * a, int32_t na, const StreamToken * b, int32_t nb);

    std::vector<Stream> streams_;
    int32_t             prefix_ = -1;
    const StreamToken * prefix_tokens_ = nullptr;
    int32_t             prefix_n_ = 0;
    uint64_t            clock_ = 0;
    int64_t             cached_tokens_ = 0;
    Index               all_;         // streams holding tokens
    Index               free_index_;  // free streams with an entry
    std::set<std::pair<uint64_t, int32_t>> entries_;  // (last use, id): entries, not the prefix's
    std::set<std::pair<uint64_t, int32_t>> lossy_;    // free streams that lose tokens when taken
    std::set<int32_t>                      clean_;    // free streams that lose nothing
};

template <class Ok>
StreamMatch StreamTable::longest(const StreamToken * t, int32_t n, int32_t cap, bool free_only, Ok ok,
                                 int32_t max_visits) const {
    const int32_t limit = std::min(n, cap);
    const Index & index = free_only ? free_index_ : all_;
    if (limit <= 0 || index.empty()) {
        return {};
    }
    // Walks out from where the query sorts, both ways: the common prefix with t never grows
    // moving away from it, so the first stream `ok` accepts, longest side first, is the best.
    auto   right = index.lower_bound(Query{t, n});
    auto   left  = right;
    auto   len   = [&](int32_t id) {
        const auto & s = at(id).snap;
        return std::min(limit, lcp(t, n, s.data(), static_cast<int32_t>(s.size())));
    };
    int32_t nr = right != index.end() ? len(*right) : 0;
    int32_t nl = left != index.begin() ? len(*std::prev(left)) : 0;
    for (int32_t visits = 0; visits < max_visits; ++visits) {
        const bool    take_left = left != index.begin() && (nl > nr || (nl == nr && (right == index.end() ||
                                                                               *std::prev(left) < *right)));
        const bool    has       = take_left || right != index.end();
        const int32_t k         = take_left ? nl : nr;
        if (!has || k <= 0) {
            break;
        }
        const int32_t id = take_left ? *std::prev(left) : *right;
        if (ok(id, k)) {
            return {id, k};
        }
        if (take_left) {
            --left;
            nl = left != index.begin() ? std::min(nl, len(*std::prev(left))) : 0;
        } else {
            ++right;
            nr = right != index.end() ? std::min(nr, len(*right)) : 0;
        }
    }
    return {};
}

}  // namespace pg
