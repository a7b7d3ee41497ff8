package replay

// maxPoints bounds a series; it must be even.
const maxPoints = 1024

// series records a value after every event in bounded memory: each point is
// the largest value of a bucket of consecutive events, and when the points
// run out, neighbouring buckets are merged and the bucket width doubles. The
// peak of every stretch of events survives, which is what a plot of DMA
// entries against a limit needs.
type series struct {
	per uint64   // events per bucket
	pts []uint64 // largest value in each bucket
	n   uint64   // values recorded
}

func (s *series) add(v uint64) {
	if s.per == 0 {
		s.per = 1
	}
	i := s.n / s.per
	if i >= maxPoints {
		for j := range maxPoints / 2 {
			s.pts[j] = max(s.pts[2*j], s.pts[2*j+1])
		}
		s.pts = s.pts[:maxPoints/2]
		s.per *= 2
		i = s.n / s.per
	}
	if i >= uint64(len(s.pts)) {
		s.pts = append(s.pts, v)
	} else {
		s.pts[i] = max(s.pts[i], v)
	}
	s.n++
}

// points returns the buckets and how many events each covers.
func (s *series) points() (pts []uint64, per uint64) {
	return s.pts, max(s.per, 1)
}
