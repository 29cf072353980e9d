#include "streams.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace pg {

StreamTable::StreamTable(int32_t n_streams) : all_(Less{this}), free_index_(Less{this}) { resize(n_streams); }

void StreamTable::resize(int32_t n_streams) {
    if (!all_.empty() || prefix_ >= 0 || !entries_.empty()) {
        throw std::logic_error("stream table: resize of a table in use");
    }
    clean_.clear();
    streams_.clear();
    streams_.resize(static_cast<size_t>(std::max(0, n_streams)));
    for (int32_t id = 0; id < size(); ++id) {
        list(id);
    }
}

int32_t StreamTable::lcp(const StreamToken * a, int32_t na, const StreamToken * b, int32_t nb) {
    const int32_t n = std::min(na, nb);
    return static_cast<int32_t>(std::mismatch(a, a + n, b).first - a);
}

// Lexicographic by held tokens, then by id: equal holdings sit together, lowest id first;
// a query sorts before every stream holding exactly it.
bool StreamTable::Less::operator()(int32_t a, int32_t b) const {
    const auto & x = t->at(a).snap;
    const auto & y = t->at(b).snap;
    const int    c = std::lexicographical_compare(x.begin(), x.end(), y.begin(), y.end())   ? -1
                     : std::lexicographical_compare(y.begin(), y.end(), x.begin(), x.end()) ? 1
                                                                                             : 0;
    return c != 0 ? c < 0 : a < b;
}

bool StreamTable::Less::operator()(const Query & q, int32_t b) const {
    const auto & y = t->at(b).snap;
    return !std::lexicographical_compare(y.begin(), y.end(), q.data, q.data + q.n);  // q <= y
}

bool StreamTable::Less::operator()(int32_t a, const Query & q) const {
    const auto & x = t->at(a).snap;
    return std::lexicographical_compare(x.begin(), x.end(), q.data, q.data + q.n);
}

Held StreamTable::held(int32_t id) const {
    const Stream & s = at(id);
    if (s.seq && s.seq->running()) {
        return {s.seq->tokens.data(), s.seq->n_past};
    }
    if (id == prefix_) {
        return {prefix_tokens_, prefix_n_};
    }
    return {s.entry.data(), static_cast<int32_t>(s.entry.size())};
}

// Takes stream `id` out of every listing (the index keyed on its snapshot included), and
// fixes its neighbours' losses, which may have depended on it.
void StreamTable::unlist(int32_t id) {
    Stream & s = at(id);
    if (s.in_entries) {
        entries_.erase({s.listed_used, id});
    }
    if (s.in_lossy) {
        lossy_.erase({s.listed_used, id});
    }
    if (s.in_clean) {
        clean_.erase(id);
    }
    if (s.in_free_index) {
        free_index_.erase(id);
    }
    s.in_entries = s.in_lossy = s.in_clean = s.in_free_index = false;
}

void StreamTable::list(int32_t id) {
    Stream & s   = at(id);
    s.listed_used = s.used;
    if (!s.entry.empty() && id != prefix_) {
        entries_.insert({s.used, id});
        s.in_entries = true;
    }
    if (is_free(id)) {
        if (!s.entry.empty()) {
            free_index_.insert(id);
            s.in_free_index = true;
        }
        if (s.lost > 0) {
            lossy_.insert({s.used, id});
            s.in_lossy = true;
        } else {
            clean_.insert(id);
            s.in_clean = true;
        }
    }
}

// Tokens of a free stream no other stream holds: past the longest prefix it shares with a
// neighbour in the index (the longest it shares with any stream).
int32_t StreamTable::count_lost(int32_t id) const {
    const Stream & s = at(id);
    if (!is_free(id) || s.snap.empty()) {
        return 0;
    }
    const auto it      = all_.find(id);
    int32_t    covered = 0;
    auto       shared  = [&](int32_t other) {
        const auto & o = at(other).snap;
        return lcp(s.snap.data(), static_cast<int32_t>(s.snap.size()), o.data(), static_cast<int32_t>(o.size()));
    };
    if (it != all_.begin()) {
        covered = shared(*std::prev(it));
    }
    if (std::next(it) != all_.end()) {
        covered = std::max(covered, shared(*std::next(it)));
    }
    return static_cast<int32_t>(s.snap.size()) - covered;
}

void StreamTable::recount_lost(int32_t id) {
    const int32_t l = count_lost(id);
    if (l != at(id).lost) {
        unlist(id);
        at(id).lost = l;
        list(id);
    }
}

// Re-indexes stream `id` if what it holds changed, and lists it anew (it may have become
// free, or taken, or been touched). Its old and new neighbours' losses are recounted.
void StreamTable::refresh(int32_t id) {
    Stream &   s = at(id);
    const Held h = held(id);
    unlist(id);
    const bool same = static_cast<size_t>(h.n) == s.snap.size() &&
                      (h.n == 0 || std::memcmp(h.data, s.snap.data(), sizeof(StreamToken) * static_cast<size_t>(h.n)) == 0);
    if (!same) {
        std::vector<int32_t> near;
        if (!s.snap.empty()) {
            auto it = all_.find(id);
            if (it != all_.begin()) {
                near.push_back(*std::prev(it));
            }
            if (std::next(it) != all_.end()) {
                near.push_back(*std::next(it));
            }
            all_.erase(it);
        }
        s.snap.assign(h.data, h.data + h.n);
        if (!s.snap.empty()) {
            auto it = all_.insert(id).first;
            if (it != all_.begin()) {
                near.push_back(*std::prev(it));
            }
            if (std::next(it) != all_.end()) {
                near.push_back(*std::next(it));
            }
        }
        for (int32_t other : near) {
            recount_lost(other);
        }
    }
    s.lost = count_lost(id);
    list(id);
}

void StreamTable::occupy(int32_t id, std::unique_ptr<Sequence> seq) {
    if (!is_free(id) || !at(id).entry.empty()) {
        throw std::logic_error("stream table: occupy of a taken stream or one that keeps an entry");
    }
    at(id).seq = std::move(seq);
    refresh(id);
}

std::unique_ptr<Sequence> StreamTable::release(int32_t id) {
    std::unique_ptr<Sequence> s = std::move(at(id).seq);
    refresh(id);
    return s;
}

void StreamTable::move_seq(int32_t from, int32_t to) {
    if (!is_free(to) || !at(to).entry.empty() || !at(from).seq) {
        throw std::logic_error("stream table: move of a sequence into a taken stream");
    }
    at(to).seq = std::move(at(from).seq);
    refresh(from);
    refresh(to);
}

void StreamTable::set_prefix(int32_t id, const StreamToken * tokens, int32_t n) {
    if (prefix_ >= 0 || !is_free(id) || !at(id).entry.empty()) {
        throw std::logic_error("stream table: a second prefix, or one in a taken stream");
    }
    prefix_        = id;
    prefix_tokens_ = tokens;
    prefix_n_      = n;
    refresh(id);
}

void StreamTable::clear_prefix() {
    const int32_t id = prefix_;
    prefix_          = -1;
    prefix_tokens_   = nullptr;
    prefix_n_        = 0;
    if (id >= 0) {
        refresh(id);
    }
}

void StreamTable::prefix_decoded(int32_t n) {
    prefix_n_ = n;
    if (prefix_ >= 0) {
        refresh(prefix_);
    }
}

void StreamTable::sync() {
    for (int32_t id = 0; id < size(); ++id) {
        if (at(id).seq || id == prefix_) {
            refresh(id);  // a memcmp when nothing changed
        }
    }
}

void StreamTable::keep(int32_t id, const StreamToken * t, int32_t n) {
    Stream & s = at(id);
    cached_tokens_ += n - static_cast<int64_t>(s.entry.size());
    s.entry.assign(t, t + n);
    s.used = ++clock_;
    refresh(id);
}

void StreamTable::drop(int32_t id) {
    Stream & s = at(id);
    if (s.entry.empty()) {
        return;
    }
    cached_tokens_ -= static_cast<int64_t>(s.entry.size());
    s.entry.clear();
    refresh(id);
}

void StreamTable::move_entry(int32_t from, int32_t to) {
    Stream & f = at(from);
    Stream & t = at(to);
    cached_tokens_ -= static_cast<int64_t>(t.entry.size());
    t.entry = std::move(f.entry);
    t.used  = f.used;
    f.entry.clear();
    refresh(from);
    refresh(to);
}

void StreamTable::touch(int32_t id) {
    at(id).used = ++clock_;
    relist(id);
}

int32_t StreamTable::oldest_entry(int32_t spare_a, int32_t spare_b) const {
    for (const auto & e : entries_) {
        if (e.second != spare_a && e.second != spare_b) {
            return e.second;
        }
    }
    return -1;
}

void StreamTable::copies_done() {
    for (auto & s : streams_) {
        s.copy_pending = false;
    }
}

int32_t StreamTable::victim(int32_t avoid, int32_t lo, int32_t hi, bool low) const {
    if (!clean_.empty()) {
        for (auto it = clean_.lower_bound(lo); it != clean_.end() && *it < hi; ++it) {
            if (*it != avoid) {
                return *it;
            }
        }
        if (low) {
            for (int32_t id : clean_) {
                if (id != avoid) {
                    return id;
                }
            }
        } else {
            for (auto it = clean_.rbegin(); it != clean_.rend(); ++it) {
                if (*it != avoid) {
                    return *it;
                }
            }
        }
    }
    for (const auto & e : lossy_) {
        if (e.second != avoid) {
            return e.second;
        }
    }
    return -1;
}

std::string StreamTable::check() const {
    int64_t cached = 0;
    size_t  n_all = 0, n_free = 0, n_entries = 0, n_lossy = 0, n_clean = 0;
    for (int32_t id = 0; id < size(); ++id) {
        const Stream & s = at(id);
        const Held     h = held(id);
        const std::string who = "stream " + std::to_string(id) + ": ";
        if (s.snap != std::vector<StreamToken>(h.data, h.data + h.n)) {
            return who + "index holds other tokens than the stream";
        }
        cached += static_cast<int64_t>(s.entry.size());
        n_all += s.snap.empty() ? 0 : 1;
        if ((all_.count(id) > 0) != !s.snap.empty()) {
            return who + "index membership";
        }
        // losses against a count over every other stream
        int32_t covered = 0;
        for (int32_t o = 0; o < size(); ++o) {
            if (o != id) {
                const auto & x = at(o).snap;
                covered = std::max(covered, lcp(s.snap.data(), static_cast<int32_t>(s.snap.size()), x.data(),
                                                static_cast<int32_t>(x.size())));
            }
        }
        const int32_t lost = is_free(id) ? static_cast<int32_t>(s.snap.size()) - covered : 0;
        if (lost != s.lost) {
            return who + "lost " + std::to_string(s.lost) + ", recounted " + std::to_string(lost);
        }
        const bool in_entries = !s.entry.empty() && id != prefix_;
        const bool in_free    = is_free(id) && !s.entry.empty();
        if (in_entries != (entries_.count({s.used, id}) > 0) || in_free != (free_index_.count(id) > 0) ||
            (is_free(id) && lost > 0) != (lossy_.count({s.used, id}) > 0) ||
            (is_free(id) && lost == 0) != (clean_.count(id) > 0)) {
            return who + "listed wrongly";
        }
        n_free += in_free ? 1 : 0;
        n_entries += in_entries ? 1 : 0;
        n_lossy += is_free(id) && lost > 0 ? 1 : 0;
        n_clean += is_free(id) && lost == 0 ? 1 : 0;
    }
    if (cached != cached_tokens_) {
        return "cached tokens " + std::to_string(cached_tokens_) + ", recounted " + std::to_string(cached);
    }
    if (n_all != all_.size() || n_free != free_index_.size() || n_entries != entries_.size() ||
        n_lossy != lossy_.size() || n_clean != clean_.size()) {
        return "stale listings";
    }
    return {};
}

}  // namespace pg
