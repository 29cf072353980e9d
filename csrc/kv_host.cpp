#include "kv_host.hpp"

#include <algorithm>
#include <cstring>

namespace pg {

namespace {

// splitmix64 over the running hash and each token: cheap, and collisions are checked
// against the tokens anyway.
uint64_t mix(uint64_t h, uint64_t v) {
    uint64_t z = h ^ (v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2));
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

constexpr char kMagic[8] = {'p', 'g', 'k', 'v', 'h', 's', 't', '1'};

template <typename T> void put_pod(std::string & out, const T & v) {
    out.append(reinterpret_cast<const char *>(&v), sizeof(T));
}

template <typename T> bool get_pod(const std::string & in, size_t & at, T & v) {
    if (in.size() - at < sizeof(T)) {
        return false;
    }
    std::memcpy(&v, in.data() + at, sizeof(T));
    at += sizeof(T);
    return true;
}

}  // namespace

HostCache::HostCache(size_t budget_bytes, int32_t block) : budget_(budget_bytes), block_(std::max(1, block)) {}

std::vector<uint64_t> HostCache::block_keys(const HostToken * t, int32_t n) const {
    std::vector<uint64_t> keys;
    keys.reserve(static_cast<size_t>(n / block_));
    uint64_t h = 0;
    for (int32_t i = 0; i + block_ <= n; i += block_) {
        for (int32_t k = i; k < i + block_; ++k) {
            h = mix(h, static_cast<uint32_t>(t[k]));
        }
        keys.push_back(h);
    }
    return keys;
}

int32_t HostCache::common(const HostEntry & e, const HostToken * t, int32_t n) const {
    const int32_t m = std::min(n, static_cast<int32_t>(e.tokens.size()));
    int32_t       k = 0;
    while (k < m && e.tokens[static_cast<size_t>(k)] == t[k]) {
        ++k;
    }
    return k;
}

HostMatch HostCache::longest(const HostToken * t, int32_t n, int32_t cap) const {
    n = std::min(n, cap);
    HostMatch best;
    if (n < block_ || entries_.empty()) {
        return best;
    }
    // The deepest block boundary some entry shares (hash chains: a key at depth k implies
    // the entry had the same k blocks before it, up to collisions, which common() settles).
    const std::vector<uint64_t> keys = block_keys(t, n);
    const std::vector<int64_t> * candidates = nullptr;
    for (uint64_t key : keys) {
        auto it = index_.find(key);
        if (it == index_.end()) {
            break;
        }
        candidates = &it->second;
    }
    if (!candidates) {
        return best;
    }
    for (int64_t id : *candidates) {
        const int32_t k = common(entries_.at(id).entry, t, n);
        if (k > best.n) {
            best = {id, k};
        }
    }
    return best.n >= block_ ? best : HostMatch{};
}

bool HostCache::holds(const HostToken * t, int32_t n) const {
    const HostMatch m = longest(t, n, n);
    return m.id >= 0 && m.n == n;
}

HostCache::Put HostCache::put(HostEntry e) {
    const int32_t n = static_cast<int32_t>(e.tokens.size());
    if (n < block_ || e.bytes() > budget_) {
        return Put::TooLarge;
    }
    const HostMatch m = longest(e.tokens.data(), n, n);
    if (m.id >= 0 && m.n == n) {
        touch(m.id);
        return Put::Held;
    }
    Slot s;
    s.keys = block_keys(e.tokens.data(), n);
    // Entries this one contains: each is indexed under its own last whole block, and a
    // contained one's keys are a leading run of this one's.
    std::vector<int64_t> contained;
    for (size_t depth = 0; depth < s.keys.size(); ++depth) {
        auto it = index_.find(s.keys[depth]);
        if (it == index_.end()) {
            break;
        }
        for (int64_t id : it->second) {
            const HostEntry & o = entries_.at(id).entry;
            const int32_t     k = static_cast<int32_t>(o.tokens.size());
            if (static_cast<size_t>(k / block_) == depth + 1 && common(o, e.tokens.data(), n) == k) {
                contained.push_back(id);  // checked once: at its own last whole block
            }
        }
    }
    for (int64_t id : contained) {
        drop(id, /*evicted=*/false);
    }
    while (bytes_ + e.bytes() > budget_ && !lru_.empty()) {
        drop(lru_.front(), /*evicted=*/true);
    }
    const int64_t id = next_id_++;
    for (uint64_t key : s.keys) {
        index_[key].push_back(id);
    }
    bytes_ += e.bytes();
    s.entry = std::move(e);
    s.lru   = lru_.insert(lru_.end(), id);
    entries_.emplace(id, std::move(s));
    return Put::Stored;
}

const HostEntry * HostCache::get(int64_t id) const {
    auto it = entries_.find(id);
    return it == entries_.end() ? nullptr : &it->second.entry;
}

void HostCache::touch(int64_t id) {
    auto it = entries_.find(id);
    if (it != entries_.end()) {
        lru_.splice(lru_.end(), lru_, it->second.lru);
    }
}

void HostCache::erase(int64_t id) {
    if (entries_.count(id)) {
        drop(id, /*evicted=*/false);
    }
}

void HostCache::drop(int64_t id, bool evicted) {
    auto it = entries_.find(id);
    for (uint64_t key : it->second.keys) {
        auto & v = index_[key];
        v.erase(std::remove(v.begin(), v.end(), id), v.end());
        if (v.empty()) {
            index_.erase(key);
        }
    }
    bytes_ -= it->second.entry.bytes();
    lru_.erase(it->second.lru);
    entries_.erase(it);
    evictions_ += evicted ? 1 : 0;
}

void HostCache::clear() {
    entries_.clear();
    index_.clear();
    lru_.clear();
    bytes_ = 0;
}

std::vector<int64_t> HostCache::ids() const { return {lru_.begin(), lru_.end()}; }

std::string HostCache::pack(const HostEntry & e, const std::string & fingerprint) {
    std::string out(kMagic, sizeof(kMagic));
    put_pod(out, static_cast<uint64_t>(fingerprint.size()));
    out += fingerprint;
    put_pod(out, e.pos_min);
    put_pod(out, static_cast<uint64_t>(e.tokens.size()));
    out.append(reinterpret_cast<const char *>(e.tokens.data()), e.tokens.size() * sizeof(HostToken));
    put_pod(out, static_cast<uint64_t>(e.state.size()));
    out.append(reinterpret_cast<const char *>(e.state.data()), e.state.size());
    return out;
}

bool HostCache::unpack(const std::string & in, const std::string & fingerprint, HostEntry & out) {
    size_t at = sizeof(kMagic);
    if (in.size() < at || std::memcmp(in.data(), kMagic, sizeof(kMagic)) != 0) {
        return false;
    }
    uint64_t n = 0;
    if (!get_pod(in, at, n) || n != fingerprint.size() || in.size() - at < n ||
        in.compare(at, n, fingerprint) != 0) {
        return false;  // state of another model or KV layout: never restored
    }
    at += n;
    HostEntry e;
    if (!get_pod(in, at, e.pos_min) || !get_pod(in, at, n) || (in.size() - at) / sizeof(HostToken) < n) {
        return false;
    }
    e.tokens.resize(n);
    std::memcpy(e.tokens.data(), in.data() + at, n * sizeof(HostToken));
    at += n * sizeof(HostToken);
    if (!get_pod(in, at, n) || in.size() - at != n) {
        return false;
    }
    e.state.assign(in.begin() + static_cast<std::ptrdiff_t>(at), in.end());
    out = std::move(e);
    return true;
}

}  // namespace pg
