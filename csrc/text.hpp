// Output text of one sequence: token bytes in, stop strings matched across token
// boundaries, complete UTF-8 out.
#pragma once

#include <string>
#include <vector>

namespace pg {

// Length of the longest prefix of `s` that does not end inside an unfinished UTF-8
// character. Invalid bytes are not "unfinished": they are left for the final decoder
// to replace, so a broken byte never holds the text back forever.
size_t utf8_complete_prefix(const std::string & s);

class TextAssembler {
public:
    explicit TextAssembler(std::vector<std::string> stops = {});

    // Appends one token's bytes. Returns true when a stop string now occurs; the text
    // is then cut just before its earliest occurrence.
    bool append(const std::string & piece);

    // Index into the stop list of the string that matched, -1 if none.
    int matched_stop() const { return matched_; }
    const std::string & bytes() const { return buf_; }

    // Bytes that can be shown now and will never change: complete characters, minus
    // any tail that might still grow into a stop string (for streaming).
    size_t stable_len() const;

    // The final text: complete characters only (a character cut off by max_tokens is
    // dropped). Invalid bytes, if the model produced any, are replaced by the caller's
    // UTF-8 decoder.
    std::string final_bytes() const { return buf_.substr(0, utf8_complete_prefix(buf_)); }

private:
    std::vector<std::string> stops_;
    size_t                   max_stop_ = 0;
    std::string              buf_;
    int                      matched_ = -1;
};

}  // namespace pg
