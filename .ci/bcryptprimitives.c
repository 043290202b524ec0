/*
 * bcryptprimitives.dll for Wine 8, built by .ci/platforms with mingw.
 *
 * Rust's std on Windows takes its random numbers (the seed of every HashMap)
 * from ProcessPrng in bcryptprimitives.dll, which Wine 8 does not have, so
 * no Rust test binary would even start. This DLL gives it ProcessPrng, with
 * Windows' documented signature, on top of Wine's BCryptGenRandom. It is
 * used only under Wine, found through WINEPATH; real Windows has its own.
 */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG))) {
            return FALSE;
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
