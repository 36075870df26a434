// The I/O a TCG guest runs on its virtio disk, for the guest benchmark (tests/bench/guest.py)
// and the guest integration test (tests/integration/test_guest.py). guest_vm.py builds it
// statically into the guest's initramfs.
//
//   guest_io seqwrite DEV OFFSET_MIB SIZE_MIB     1 MiB O_DIRECT writes of 0x6b, then fsync
//   guest_io seqread  DEV OFFSET_MIB SIZE_MIB     1 MiB O_DIRECT reads
//   guest_io verify   DEV OFFSET_MIB SIZE_MIB BYTE
//                                                 1 MiB O_DIRECT reads; every byte must be BYTE
//   guest_io randread|randwrite DEV OFFSET_MIB SIZE_MIB THREADS SECONDS
//                                                 4 KiB O_DIRECT random I/O (writes of 0x3c),
//                                                 one request in flight per thread (THREADS =
//                                                 queue depth)
//
// Prints one line, "RESULT <job> <value> <unit>", or "ERROR <job> <reason>" and exits 1.
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <pthread.h>
#include <string>
#include <time.h>
#include <unistd.h>
#include <vector>

#include <sys/stat.h>

namespace {

constexpr long kMiB = 1024 * 1024;
constexpr long kSmallBlock = 4096;

double now_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

[[noreturn]] void fail(const char* job, const char* what) {
    std::printf("ERROR %s %s: %s\n", job, what, std::strerror(errno));
    std::fflush(stdout);
    std::exit(1);
}

void* aligned_buffer(long size, unsigned char fill) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, static_cast<size_t>(size)) != 0)
        return nullptr;
    std::memset(p, fill, static_cast<size_t>(size));
    return p;
}

// Reads [offset, offset + size) and checks that every byte is `expect`.
int verify(const char* job, const char* dev, long offset, long size, int expect) {
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        fail(job, "open");
    auto* buf = static_cast<unsigned char*>(aligned_buffer(kMiB, 0));
    if (buf == nullptr)
        fail(job, "allocate");
    for (long done = 0; done < size; done += kMiB) {
        if (pread(fd, buf, kMiB, offset + done) != kMiB)
            fail(job, "pread");
        for (long i = 0; i < kMiB; ++i) {
            if (buf[i] != expect) {
                std::printf("ERROR %s byte %ld is 0x%02x, not 0x%02x\n", job, offset + done + i,
                            buf[i], expect);
                return 1;
            }
        }
    }
    std::printf("RESULT %s %ld MiB\n", job, size / kMiB);
    close(fd);
    free(buf);
    return 0;
}

// Sequential 1 MiB requests over [offset, offset + size); writes end with fsync, inside the
// timed span, so an allocating write counts what it takes to make the data durable.
int sequential(const char* job, const char* dev, long offset, long size, bool write) {
    int fd = open(dev, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        fail(job, "open");
    void* buf = aligned_buffer(kMiB, 0x6b);
    if (buf == nullptr)
        fail(job, "allocate");
    double start = now_seconds();
    for (long done = 0; done < size; done += kMiB) {
        ssize_t n =
            write ? pwrite(fd, buf, kMiB, offset + done) : pread(fd, buf, kMiB, offset + done);
        if (n != kMiB)
            fail(job, write ? "pwrite" : "pread");
    }
    if (write && fsync(fd) != 0)
        fail(job, "fsync");
    double took = now_seconds() - start;
    std::printf("RESULT %s %.1f MB/s\n", job, static_cast<double>(size) / 1e6 / took);
    close(fd);
    free(buf);
    return 0;
}

struct RandomLoad {
    const char* job;
    int fd;
    bool write;
    long offset;
    long blocks;
    double deadline;
    std::atomic<long> done{0};
    std::atomic<int> failed_errno{0};
};

void* random_worker(void* arg) {
    auto* load = static_cast<RandomLoad*>(arg);
    void* buf = aligned_buffer(kSmallBlock, 0x3c);
    unsigned seed = static_cast<unsigned>(reinterpret_cast<uintptr_t>(&buf));
    if (buf == nullptr) {
        load->failed_errno = ENOMEM;
        return nullptr;
    }
    long count = 0;
    while (now_seconds() < load->deadline) {
        long block = static_cast<long>(rand_r(&seed)) % load->blocks;
        off_t at = load->offset + block * kSmallBlock;
        ssize_t n = load->write ? pwrite(load->fd, buf, kSmallBlock, at)
                                : pread(load->fd, buf, kSmallBlock, at);
        if (n != kSmallBlock) {
            load->failed_errno = n < 0 ? errno : EIO;
            break;
        }
        ++count;
    }
    load->done += count;
    free(buf);
    return nullptr;
}

int random_io(const char* job, const char* dev, long offset, long size, int threads, int seconds,
              bool write) {
    RandomLoad load;
    load.job = job;
    load.fd = open(dev, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (load.fd < 0)
        fail(job, "open");
    load.write = write;
    load.offset = offset;
    load.blocks = size / kSmallBlock;
    double start = now_seconds();
    load.deadline = start + seconds;
    std::vector<pthread_t> workers(static_cast<size_t>(threads));
    for (auto& t : workers) {
        if (pthread_create(&t, nullptr, random_worker, &load) != 0)
            fail(job, "pthread_create");
    }
    for (auto& t : workers)
        pthread_join(t, nullptr);
    double took = now_seconds() - start;
    if (load.failed_errno != 0) {
        errno = load.failed_errno;
        fail(job, write ? "pwrite" : "pread");
    }
    std::printf("RESULT %s %.0f IOPS\n", job, static_cast<double>(load.done) / took);
    close(load.fd);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: guest_io JOB DEV OFFSET_MIB SIZE_MIB [THREADS SECONDS]\n");
        return 2;
    }
    std::string job = argv[1];
    const char* dev = argv[2];
    long offset = std::atol(argv[3]) * kMiB;
    long size = std::atol(argv[4]) * kMiB;
    if (job == "seqwrite" || job == "seqread") {
        return sequential(argv[1], dev, offset, size, job == "seqwrite");
    }
    if (job == "verify" && argc == 6) {
        return verify(argv[1], dev, offset, size, std::atoi(argv[5]));
    }
    if ((job == "randread" || job == "randwrite") && argc == 7) {
        return random_io(argv[1], dev, offset, size, std::atoi(argv[5]), std::atoi(argv[6]),
                         job == "randwrite");
    }
    std::fprintf(stderr, "guest_io: unknown job or missing arguments: %s\n", argv[1]);
    return 2;
}
