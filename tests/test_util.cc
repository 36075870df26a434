#include "test_util.h"

#include <cstdio>

namespace imgfs::test {

int shell(const std::string& cmd) {
    int st = std::system(cmd.c_str());
    if (st == -1) {
        return -1;
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

std::string shell_output(const std::string& cmd) {
    std::string out;
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) {
        return out;
    }
    char buf[4096];
    size_t n = 0;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) {
        out.append(buf, n);
    }
    pclose(p);
    return out;
}

bool have_tool(const std::string& tool) {
    return shell("command -v " + tool + " >/dev/null 2>&1") == 0;
}

bool in_ci() {
    const char* ci = std::getenv("CI");
    return ci != nullptr && *ci != '\0';
}

}  // namespace imgfs::test
