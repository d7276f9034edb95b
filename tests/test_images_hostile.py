"""`read_image` and `probe_image` on hostile bytes (issue 13, findings 3 and 10).

A property-based test (hypothesis) corrupts valid PNG, JPEG, TIFF, BMP, GIF and DICOM files (bit flips,
truncations, insertions, header fields overwritten; DICOM headers also built with inconsistent values) and
asserts the one promise of `read_image`: only `InvalidImageError` (or a subclass) ever escapes, and a success
is an `uint8` HxW or HxWx3 array within the limits, whose size `probe_image` gives from the header alone.
Then explicit cases: multi-frame RGB DICOM, non-finite rescale and window values, and `probe_image` against
`read_image` on valid files of every format. The examples are derandomized so CI sees the same corpus every run.
"""
import io, math, zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from biovis.errors import InvalidImageError, UploadTooLargeError
from biovis.images import read_image, probe_image, write_dicom

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')   # pydicom warns of every invalid value it reads

LIMITS = dict(max_side=96, max_pixels=96 * 64)          # small, so a mutated header that claims a big image is refused
N = 600                                                  # examples per format
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _pil_bytes(a, fmt, mode=None, **kw):
    im = Image.fromarray(a) if mode is None else Image.fromarray(a).convert(mode)
    b = io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()


def _seeds():
    rng = np.random.default_rng(0)
    rgb, gray = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), rng.integers(0, 256, (12, 16), dtype=np.uint8)
    g16 = (rng.integers(0, 65536, (12, 16))).astype(np.uint16)
    gif2 = io.BytesIO()
    Image.fromarray(rgb).convert('P').save(gif2, 'GIF', save_all=True, append_images=[Image.fromarray(255 - rgb).convert('P')])
    tif2 = io.BytesIO()
    Image.fromarray(rgb).save(tif2, 'TIFF', save_all=True, append_images=[Image.fromarray(gray)])
    return {
        'png': [_pil_bytes(rgb, 'PNG'), _pil_bytes(gray, 'PNG'), _pil_bytes(rgb, 'PNG', 'P'), _pil_bytes(g16, 'PNG'),
                _pil_bytes(np.dstack([rgb, np.full((12, 16), 255, np.uint8)]), 'PNG'), _pil_bytes(gray > 128, 'PNG')],
        'jpeg': [_pil_bytes(rgb, 'JPEG'), _pil_bytes(gray, 'JPEG'), _pil_bytes(rgb, 'JPEG', 'CMYK'),
                 _pil_bytes(rgb, 'JPEG', progressive=True)],
        'tiff': [_pil_bytes(rgb, 'TIFF'), _pil_bytes(gray, 'TIFF', compression='tiff_lzw'), _pil_bytes(g16, 'TIFF'),
                 _pil_bytes(rgb, 'TIFF', compression='tiff_deflate'), tif2.getvalue()],
        'bmp': [_pil_bytes(rgb, 'BMP'), _pil_bytes(gray, 'BMP'), _pil_bytes(rgb, 'BMP', 'P'), _pil_bytes(gray > 128, 'BMP')],
        'gif': [_pil_bytes(rgb, 'GIF', 'P'), _pil_bytes(gray, 'GIF'), gif2.getvalue()],
        'dicom': [write_dicom((g16 >> 4).astype(np.uint16)), write_dicom(g16 >> 4, monochrome1=True),
                  write_dicom(np.stack([rgb, rgb[::-1]])), write_dicom(rgb), write_dicom(np.stack([g16, g16]) >> 4),
                  write_dicom(g16 >> 4, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=400)],
    }

SEEDS = _seeds()


def _fix_png_crcs(b: bytearray) -> bytearray:
    "Recompute the CRC of every whole PNG chunk, so that a corrupted header field reaches the decoder."
    i = 8
    while i + 12 <= len(b):
        n = int.from_bytes(b[i:i + 4], 'big')
        if i + 12 + n > len(b): break
        b[i + 8 + n:i + 12 + n] = zlib.crc32(b[i + 4:i + 8 + n]).to_bytes(4, 'big'); i += 12 + n
    return b


HEADERS = dict(dicom=(132, 400), png=(8, 60))            # where the header fields lie (after the magic numbers)


@st.composite
def corrupted(draw, fmt):
    "One of the seeds of `fmt` with one to four corruptions, most of them in its header."
    b = bytearray(draw(st.sampled_from(SEEDS[fmt])))
    lo, hi = HEADERS.get(fmt, (0, 200))
    for _ in range(draw(st.integers(1, 4))):
        if not b: break
        pos = draw(st.one_of(st.integers(min(lo, len(b) - 1), min(hi, len(b)) - 1), st.integers(0, len(b) - 1)))
        op = draw(st.sampled_from(['flip', 'flip', 'truncate', 'insert', 'overwrite', 'overwrite']))
        if op == 'flip': b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 'truncate': del b[pos:]
        elif op == 'insert': b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            v = draw(st.one_of(st.sampled_from([b'\0' * 4, b'\xff' * 4, b'\x7f\xff\xff\xff', b'\x80\0\0\0', b'\0\0\1\0',
                                                b'\xff\xff', b'\0', b'\x01']), st.binary(min_size=1, max_size=8)))
            b[pos:pos + len(v)] = v
    if fmt == 'png' and draw(st.booleans()): b = _fix_png_crcs(b)
    return bytes(b)


def _holds_promise(b):
    "The property: only InvalidImageError escapes, a success is uint8 HxW(x3) in the limits, and the probe agrees."
    try: a = read_image(b, **LIMITS)
    except InvalidImageError: a = None
    try: wh = probe_image(b, **LIMITS)
    except InvalidImageError: wh = None
    if a is None: return
    assert a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)), (a.dtype, a.shape)
    h, w = a.shape[:2]
    assert 1 <= h <= LIMITS['max_side'] and 1 <= w <= LIMITS['max_side'] and h * w <= LIMITS['max_pixels']
    assert wh == (w, h), (wh, a.shape)                   # the probe passes what read_image decodes, at its size


@pytest.mark.parametrize('fmt', sorted(SEEDS))
def test_corrupted_files_raise_only_invalid_image(fmt):
    @FUZZ
    @given(corrupted(fmt))
    def holds(b): _holds_promise(b)
    holds()


_nums = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 1e-308, 1.0, 'abc', '1\\2', '']),
                  st.floats(-1e6, 1e6))


@st.composite
def dicom_headers(draw):
    "A DICOM file whose image elements are drawn independently of each other and of its pixel data."
    rows, cols = (0 if draw(st.integers(0, 15)) == 0 else draw(st.integers(1, 40)) for _ in 'rc')
    tags = dict(Rows=rows, Columns=cols)
    if draw(st.booleans()):                               # bits that agree with each other, so decoding goes further
        ba = draw(st.sampled_from([1, 8, 16, 32])); bs = draw(st.integers(1, ba))
        tags.update(BitsAllocated=ba, BitsStored=bs, HighBit=bs - 1, SamplesPerPixel=draw(st.sampled_from([1, 3])))
    for name, s in [('NumberOfFrames', st.sampled_from([0, 1, 2, 3, 10**6])), ('SamplesPerPixel', st.integers(0, 4)),
                    ('PhotometricInterpretation', st.sampled_from(['MONOCHROME1', 'MONOCHROME2', 'RGB', 'YBR_FULL', 'YBR_FULL_422',
                                                                   'PALETTE COLOR', 'YBR_ICT', 'HSV', ''])),
                    ('PlanarConfiguration', st.integers(0, 2)), ('BitsAllocated', st.sampled_from([1, 8, 12, 16, 32, 64])),
                    ('BitsStored', st.integers(0, 33)), ('HighBit', st.integers(0, 33)), ('PixelRepresentation', st.integers(0, 2)),
                    ('RescaleSlope', _nums), ('RescaleIntercept', _nums), ('WindowCenter', _nums), ('WindowWidth', _nums)]:
        if name not in tags and draw(st.booleans()): tags[name] = draw(s)
    n = draw(st.one_of(*(st.just(rows * cols * k) for k in (1, 2, 3, 6)), st.integers(0, 10_000)))
    a = np.frombuffer(draw(st.binary(min_size=n, max_size=n)) + b'\0' * 2, np.uint8)[:max(n, 2) // 2 * 2]
    ds = pydicom.dcmread(io.BytesIO(write_dicom(np.zeros((2, 1), np.uint16))))
    for k, v in tags.items():
        try: setattr(ds, k, v)
        except ValueError: pass                                # a value pydicom refuses to write ('abc' as a DS)
    ds.PixelData = a.tobytes()
    out = io.BytesIO(); ds.save_as(out); return out.getvalue()


@FUZZ
@given(dicom_headers())
def test_inconsistent_dicom_headers_raise_only_invalid_image(b):
    _holds_promise(b)


# --- explicit cases ---------------------------------------------------------------------------------------------

def test_tiff_whose_next_ifd_points_into_its_header_gives_its_first_frame():
    """Found by the fuzz above: `read_image` counted the frames (`n_frames` walks every IFD) and Pillow raised
    TypeError('Missing dimensions') on the broken second one, which escaped (a 500). Only the first frame is read now."""
    b = bytearray(_pil_bytes(np.zeros((12, 16), np.uint16), 'TIFF'))
    ifd = int.from_bytes(b[4:8], 'little'); n = int.from_bytes(b[ifd:ifd + 2], 'little')
    b[ifd + 2 + 12 * n:ifd + 6 + 12 * n] = (1).to_bytes(4, 'little')      # the next IFD at offset 1
    assert (read_image(bytes(b)) == np.zeros((12, 16), np.uint8)).all() and probe_image(bytes(b)) == (16, 12)



def test_multiframe_rgb_dicom_decodes_its_first_frame():
    frames = np.random.default_rng(1).integers(0, 256, (3, 20, 24, 3)).astype(np.uint8)
    a = read_image(write_dicom(frames))
    assert a.shape == (20, 24, 3) and a.dtype == np.uint8 and (a == frames[0]).all()
    assert probe_image(write_dicom(frames)) == (24, 20)


def test_multiframe_dicom_decodes_one_frame_only(monkeypatch):
    "A 1000-frame file is decoded one frame: pydicom's decoder is asked for index 0, never for the whole volume."
    import pydicom.pixels as P
    calls = []
    real = P.pixel_array
    monkeypatch.setattr(P, 'pixel_array', lambda ds, **kw: calls.append(kw) or real(ds, **kw))
    vol = np.random.default_rng(2).integers(0, 4096, (1000, 8, 8)).astype(np.uint16)
    a = read_image(write_dicom(vol))
    assert a.shape == (8, 8) and calls == [dict(index=0)]


def test_ybr_and_planar_dicom_become_rgb():
    rgb = np.random.default_rng(3).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    planar = write_dicom(np.zeros((10, 12, 3), np.uint8), PlanarConfiguration=1)
    ds = pydicom.dcmread(io.BytesIO(planar)); ds.PixelData = np.moveaxis(rgb, -1, 0).tobytes()
    b = io.BytesIO(); ds.save_as(b); assert (read_image(b.getvalue()) == rgb).all()
    ycc = np.asarray(Image.fromarray(rgb).convert('YCbCr'))
    a = read_image(write_dicom(ycc, PhotometricInterpretation='YBR_FULL'))
    assert a.shape == (10, 12, 3) and np.abs(a.astype(int) - rgb).max() <= 3


def test_palette_dicom_goes_through_its_colour_table():
    idx = np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) % 4
    lut = {c: np.array(v, np.uint16) * 257 for c, v in zip('Red Green Blue'.split(), [[0, 255, 0, 9], [0, 0, 255, 9], [255, 0, 0, 9]])}
    tags = {f'{c}PaletteColorLookupTableDescriptor': [4, 0, 16] for c in lut}
    tags.update({f'{c}PaletteColorLookupTableData': v.tobytes() for c, v in lut.items()})
    a = read_image(write_dicom(idx, bits=8, PhotometricInterpretation='PALETTE COLOR', **tags))
    assert a.shape == (10, 12, 3) and a[0, 0].tolist() == [0, 0, 255] and a[0, 1].tolist() == [255, 0, 0]


@pytest.mark.parametrize('tag,value', [('RescaleSlope', 'nan'), ('RescaleSlope', 'inf'), ('RescaleSlope', '-inf'),
                                       ('RescaleIntercept', 'nan'), ('RescaleIntercept', 'inf'), ('WindowCenter', 'nan'),
                                       ('WindowWidth', 'inf'), ('WindowWidth', 0), ('WindowWidth', -10), ('RescaleSlope', 0)])
def test_dicom_with_numbers_that_make_no_picture_is_refused(tag, value):
    xray = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    with pytest.raises(InvalidImageError, match=tag):
        read_image(write_dicom(xray, **{'WindowCenter': 2000, 'WindowWidth': 1000, tag: value}))


def test_dicom_rescale_overflow_is_refused():
    xray = np.full((8, 8), 4095, np.uint16)
    with pytest.raises(InvalidImageError, match='overflow'): read_image(write_dicom(xray, RescaleSlope=1e308))


def test_dicom_window_is_applied_exactly():
    "The float32 map gives the float64 answer: windows narrow and wide, slopes positive and negative, MONOCHROME1."
    x = np.random.default_rng(4).integers(0, 65536, (64, 64)).astype(np.uint16)
    for slope, inter, wc, ww, m1 in [(1, 0, 30000.5, 3, False), (0.5, -1024, 40, 400, False), (-2, 100, -5000, 20000, True),
                                     (1, 0, None, None, False), (3e-3, 7, None, None, True)]:
        tags = dict(RescaleSlope=slope, RescaleIntercept=inter, **({} if wc is None else dict(WindowCenter=wc, WindowWidth=ww)))
        v = x.astype(np.float64) * slope + inter
        lo, hi = (v.min(), v.max()) if wc is None else (wc - ww / 2, wc + ww / 2)
        want = np.clip((v - lo) / (hi - lo), 0, 1)
        want = ((1 - want if m1 else want) * 255 + 0.5).astype(np.uint8)
        got = read_image(write_dicom(x, bits=16, monochrome1=m1, **tags))
        assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.999


def _valid_files():
    rng = np.random.default_rng(5)
    rgb, gray = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), rng.integers(0, 256, (30, 50), dtype=np.uint8)
    out = {f'{f}-{m}': _pil_bytes(rgb if m == 'rgb' else gray, f) for f in ('PNG', 'JPEG', 'TIFF', 'BMP', 'WEBP') for m in ('rgb', 'gray')}
    out['GIF'] = _pil_bytes(rgb, 'GIF', 'P')
    out['DICOM'] = write_dicom(gray.astype(np.uint16) * 16)
    out['DICOM-rgb-frames'] = write_dicom(np.stack([rgb, rgb]))
    return out


@pytest.mark.parametrize('name,b', sorted(_valid_files().items()))
def test_probe_gives_the_size_read_image_decodes(name, b):
    a = read_image(b)
    assert probe_image(b) == (a.shape[1], a.shape[0]) == (50, 30)
    for lim in (dict(max_side=49), dict(max_pixels=50 * 30 - 1)):           # both refuse just under the size
        with pytest.raises(InvalidImageError): read_image(b, **lim)
        with pytest.raises(InvalidImageError): probe_image(b, **lim)
    with pytest.raises(UploadTooLargeError): probe_image(b, max_bytes=len(b) - 1)
    with pytest.raises(UploadTooLargeError): read_image(b, max_bytes=len(b) - 1)


def test_probe_refuses_a_small_file_that_claims_a_big_image():
    b = io.BytesIO(); Image.new('L', (8000, 8000)).save(b, 'PNG'); b = b.getvalue()
    assert len(b) < 200_000 and probe_image(b) == (8000, 8000)
    for f in (probe_image, read_image):
        with pytest.raises(InvalidImageError, match='Mpx'): f(b, max_pixels=16 * 2**20)
    d = write_dicom(np.zeros((4, 4), np.uint16), Rows=9000, Columns=9000)
    for f in (probe_image, read_image):
        with pytest.raises(InvalidImageError, match='Mpx'): f(d)


@pytest.mark.parametrize('b', [b'', b'hello, I am text', b'\0' * 128 + b'DICM' + b'\xff' * 64, b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n',
                               b'SIMPLE  =                    T' + b' ' * 2850])
def test_probe_and_read_refuse_non_images(b):
    for f in (probe_image, read_image):
        with pytest.raises(InvalidImageError): f(b)
