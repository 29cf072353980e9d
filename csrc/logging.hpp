// Routing of llama.cpp's log output.
//
// llama.cpp has one process-wide log callback. parallel_gen installs its own once and
// chains to whatever was there before (llama_cpp's Python logger), so work done by
// parallel_gen is quiet unless asked, while other users of libllama keep their logs.
#pragma once

#include <string>

namespace pg {

// Installs the chaining callback; idempotent.
void install_log_router();

// While alive on a thread, llama.cpp messages from that thread are parallel_gen's:
// printed to stderr only when verbose, and errors are remembered for exception texts.
class LogScope {
public:
    explicit LogScope(bool verbose);
    ~LogScope();
    LogScope(const LogScope &) = delete;
    LogScope & operator=(const LogScope &) = delete;

private:
    int  prev_depth_;
    bool prev_verbose_;
};

// The warnings and errors llama.cpp logged on this thread inside scopes, most recent
// last, then forgotten. Used to say *why* a load or context creation failed.
std::string take_log_errors();

}  // namespace pg
