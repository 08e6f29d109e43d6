#include <gtest/gtest.h>
TEST(CudaEmulation, Placeholder) {}
