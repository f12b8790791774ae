//! The global allocator: mimalloc, asked for a plain block wherever malloc's alignment suffices.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// What every block of `size >= MIN_ALIGN` bytes from `mi_malloc` is aligned to, as from any C
/// malloc: `sizeof(max_align_t)` on the 64-bit targets credgate is built for (mimalloc's
/// `MI_MAX_ALIGN_SIZE`). Smaller blocks are aligned to their size rounded up to a word.
const MIN_ALIGN: usize = 16;

/// mimalloc, as `mimalloc::MiMalloc` but without its aligned entry points where they are not
/// needed: `mi_malloc_aligned` takes a slower, generic path for every block over 1 KiB (hyper's
/// buffers, boxed request futures), about 100 instructions more each time.
pub struct MiMalloc;

/// Whether a plain mimalloc block is aligned enough for `layout` (the rule std's own `System`
/// allocator applies to malloc).
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes plain and aligned
// blocks alike); a plain block is used only where its alignment meets the layout's.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size())
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align())
        };
        p.cast()
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size())
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align())
        };
        p.cast()
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr.cast(), new_size)
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align())
        };
        p.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size from 1 byte to 64 KiB, at every alignment up to 4 KiB, are aligned
    /// as asked, keep what was written to them through a realloc, and are freed.
    #[test]
    fn every_block_is_aligned_as_its_layout_asks() {
        let a = MiMalloc;
        let sizes = (1..=64).chain([100, 1000, 1025, 1500, 4096, 8193, 65536]);
        for size in sizes {
            for align in (0..=12).map(|s| 1usize << s) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: layouts of non-zero size; each block is freed once, with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && p as usize % align == 0, "{size}/{align}");
                    p.write_bytes(0xa5, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert!(
                        !q.is_null() && q as usize % align == 0,
                        "{size}/{align} grown"
                    );
                    assert!((0..size).all(|i| *q.add(i) == 0xa5));
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert!(
                        !z.is_null() && z as usize % align == 0,
                        "{size}/{align} zeroed"
                    );
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
