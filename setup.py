"""The one compiled part: study/data/_jpegcrop.c, partial JPEG decoding for the CPU path's training
views (docs/imagenet.md). It needs a C compiler and libjpeg-turbo's headers (Debian/Ubuntu:
libjpeg-dev; macOS: `brew install jpeg-turbo`, with CFLAGS/LDFLAGS pointing at it). Without them the
install still succeeds and the views are decoded whole by PIL, more slowly, to the same pixels."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("study.data._jpegcrop", ["study/data/_jpegcrop.c"], libraries=["jpeg"], optional=True)])
