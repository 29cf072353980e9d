#include "text.hpp"

#include <algorithm>

namespace pg {

size_t utf8_complete_prefix(const std::string & s) {
    const size_t n = s.size();
    // A character is at most 4 bytes, so only the last 3 can be an unfinished start.
    for (size_t back = 1; back <= 3 && back <= n; ++back) {
        const unsigned char c = static_cast<unsigned char>(s[n - back]);
        if ((c & 0xC0) == 0x80) {
            continue;  // continuation byte: keep looking for the lead byte
        }
        size_t need = 0;
        if ((c & 0xE0) == 0xC0) {
            need = 2;
        } else if ((c & 0xF0) == 0xE0) {
            need = 3;
        } else if ((c & 0xF8) == 0xF0) {
            need = 4;
        } else {
            return n;  // ASCII or an invalid lead byte: nothing is pending
        }
        return back < need ? n - back : n;
    }
    return n;
}

TextAssembler::TextAssembler(std::vector<std::string> stops) : stops_(std::move(stops)) {
    for (const auto & s : stops_) {
        max_stop_ = std::max(max_stop_, s.size());
    }
}

bool TextAssembler::append(const std::string & piece) {
    if (matched_ >= 0) {
        return true;
    }
    const size_t old = buf_.size();
    buf_ += piece;
    if (stops_.empty()) {
        return false;
    }
    // A match must end in the new bytes, so it starts at most max_stop_-1 bytes earlier.
    const size_t from = old >= max_stop_ ? old - max_stop_ + 1 : 0;
    size_t best = std::string::npos;
    for (size_t i = 0; i < stops_.size(); ++i) {
        const size_t p = buf_.find(stops_[i], from);
        if (p != std::string::npos && (best == std::string::npos || p < best)) {
            best     = p;
            matched_ = static_cast<int>(i);
        }
    }
    if (best == std::string::npos) {
        return false;
    }
    buf_.resize(best);
    return true;
}

size_t TextAssembler::stable_len() const {
    size_t len = utf8_complete_prefix(buf_);
    if (matched_ >= 0) {
        return len;
    }
    // Hold back the longest tail that is a proper prefix of some stop string.
    size_t hold = 0;
    for (const auto & s : stops_) {
        for (size_t k = std::min(s.size() - 1, len); k > hold; --k) {
            if (buf_.compare(len - k, k, s, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    len -= hold;
    // Never split a character when holding back.
    while (len > 0 && (static_cast<unsigned char>(buf_[len]) & 0xC0) == 0x80) {
        --len;
    }
    return len;
}

}  // namespace pg
