/* Partial JPEG decoding for the CPU path's training views (study.data.decode).
 *
 * A training view keeps a box of the image, 16-58% of a 500x375 photo, yet a
 * whole-image decoder (PIL's) runs the inverse DCT, upsampling and colour conversion over every
 * pixel. libjpeg-turbo can do less: jpeg_skip_scanlines passes over the rows above the box without
 * reconstructing them, jpeg_crop_scanline reconstructs only the iMCU columns that hold the box, and
 * decoding stops after the box's last row. Neither PIL nor torchvision exposes these calls, so this
 * module does, and nothing more: the resampling stays PIL's. It needs libjpeg-turbo 2.0.6 or later
 * (older ones had bugs in jpeg_skip_scanlines, an endless loop among them); with an older library it
 * does not compile, and the package decodes whole images with PIL instead.
 *
 * decode_region(data, denom, x0, y0, x1, y1) -> (pixels, x, y, width, height)
 *   data: a JPEG file's bytes (3-component; the caller sends greyscale and CMYK files to PIL).
 *   denom: decode at 1/denom of the size (1, 2, 4 or 8: PIL's draft scales).
 *   x0, y0, x1, y1: the region wanted, in pixels of the (scaled) image, x1 and y1 exclusive.
 *   Returns the RGB pixels (bytes, row-major, 3 bytes a pixel) of the region decoded, which starts at
 *   column x (at or left of x0: an iMCU boundary), row y (= y0) and is width x height pixels. Its
 *   pixels are those of the whole image's decode but for its outermost columns (unless they are the
 *   image's), whose chroma is upsampled as at an edge. A region narrower than MIN_WIDTH is widened
 *   to it: at a width of a chroma sample or two libjpeg-turbo upsamples chroma differently.
 *   Raises ValueError with libjpeg's message on corrupt data, or when the data ends before the rows
 *   wanted do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 2000006
#error "_jpegcrop needs libjpeg-turbo 2.0.6 or later (jpeg_skip_scanlines and jpeg_crop_scanline without their early bugs)"
#endif

#define MIN_WIDTH 32

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    int truncated;
};

static void on_error(j_common_ptr cinfo) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* Warnings are not printed. The data ending early is one (libjpeg pads the image with grey): here it
 * is an error, as it is for PIL. Other warnings (extraneous bytes before a marker, say) are ignored,
 * as PIL ignores them. */
static void on_message(j_common_ptr cinfo, int level) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF && !err->truncated) {
        err->truncated = 1;
        (*cinfo->err->format_message)(cinfo, err->message);
    }
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    int denom, x0, y0, x1, y1;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &denom, &x0, &y0, &x1, &y1))
        return NULL;
    if (!(denom == 1 || denom == 2 || denom == 4 || denom == 8) || x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "decode_region: denom must be 1, 2, 4 or 8 and the region non-empty");
        return NULL;
    }

    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    /* Written between setjmp and longjmp, read after: volatile. */
    unsigned char *volatile pixels = NULL;
    volatile int failed = 0, too_small = 0;
    JDIMENSION x = (JDIMENSION)x0, width = 0;
    int height = 0;

    memset(&err, 0, sizeof err);
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;

    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&cinfo, TRUE);
        cinfo.out_color_space = JCS_RGB;
        cinfo.scale_num = 1;
        cinfo.scale_denom = (unsigned int)denom;
        jpeg_start_decompress(&cinfo);
        if ((JDIMENSION)x1 > cinfo.output_width || (JDIMENSION)y1 > cinfo.output_height || cinfo.output_components != 3) {
            too_small = 1;
        } else {
            if (x1 - x0 < MIN_WIDTH) {  /* widen to the right, then to the left, within the image */
                x1 = x0 + MIN_WIDTH > (int)cinfo.output_width ? (int)cinfo.output_width : x0 + MIN_WIDTH;
                x0 = x1 - MIN_WIDTH < 0 ? 0 : x1 - MIN_WIDTH;
                x = (JDIMENSION)x0;
            }
            width = (JDIMENSION)(x1 - x0);
            if (width < cinfo.output_width)  /* the whole width: nothing to crop (and crop_scanline would refuse) */
                jpeg_crop_scanline(&cinfo, &x, &width);
            else
                x = 0;
            height = y1 - y0;
            pixels = malloc((size_t)width * 3 * (size_t)height);
            if (pixels != NULL) {
                if (y0 > 0)
                    jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
                for (int row = 0; row < height && !err.truncated; row++) {
                    JSAMPROW line = pixels + (size_t)row * width * 3;
                    jpeg_read_scanlines(&cinfo, &line, 1);
                }
            }
        }
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);

    if (failed || err.truncated || too_small || pixels == NULL) {
        free(pixels);
        if (failed || err.truncated)
            PyErr_Format(PyExc_ValueError, "%s", err.message);
        else if (too_small)
            PyErr_SetString(PyExc_ValueError, "decode_region: the region lies outside the image");
        else
            PyErr_NoMemory();
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)pixels, (Py_ssize_t)width * 3 * height);
    free(pixels);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(Niiii)", out, (int)x, y0, (int)width, height);
}

static PyObject *library_version(PyObject *self, PyObject *unused) {
#ifdef LIBJPEG_TURBO_VERSION
#define STR2(v) #v
#define STR(v) STR2(v)
    return PyUnicode_FromString("libjpeg-turbo " STR(LIBJPEG_TURBO_VERSION));
#else
    return PyUnicode_FromFormat("libjpeg %d", JPEG_LIB_VERSION);
#endif
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, denom, x0, y0, x1, y1) -> (rgb bytes, x, y, width, height): the rows y0..y1 "
     "and at least the columns x0..x1 of a JPEG at 1/denom of its size (see the module's source)."},
    {"library_version", library_version, METH_NOARGS, "The JPEG library this module was compiled against."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegcrop",
    "Partial JPEG decoding (libjpeg-turbo's skip and crop scanline calls) for study.data.decode.", -1, methods,
};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
