// imgfs command line.
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
    if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
        std::puts("usage: imgfs COMMAND ...   (see README.md)");
        return argc < 2 ? 1 : 0;
    }
    std::fprintf(stderr, "imgfs: unknown command '%s'\n", argv[1]);
    return 1;
}
