/*
 * errors.c - the core's error table (rows in vu.h), read by Python so that log
 * lines and exceptions use the texts written next to the codes.
 */
#include "vu.h"

static const struct vu_error_info vu_errors[] = {VU_ERRORS(VU_ERROR_INFO)};

const struct vu_error_info *vu_error_table(uint32_t *n)
{
    *n = sizeof(vu_errors) / sizeof(vu_errors[0]);
    return vu_errors;
}
